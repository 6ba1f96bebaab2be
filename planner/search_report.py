"""`moe-plan --search` as a ranked table and as JSON."""

from __future__ import annotations

from planner.plan import Plan
from planner.report import as_dict
from planner.search import Candidate
from trainer.metrics import text_table

GiB = float(1 << 30)
COLUMNS = [("#", "rank", "{}", 3), ("tp", "tp", "{}", 3), ("ep", "ep", "{}", 4), ("dp", "dp", "{}", 4),
           ("ZeRO", "zero_stage", "{}", 5), ("recompute", "recompute", "{}", 10),
           ("micro", "micro_batch_size", "{}", 6), ("accum", "grad_accum", "{}", 6),
           ("peak GiB", "peak", "{:.1f}", 9, 1 / GiB), ("need GiB", "needed", "{:.1f}", 9, 1 / GiB),
           ("fits", "fits", "{}", 5), ("step ms", "step_s", "{:.0f}", 9, 1e3),
           ("tokens/s", "tokens_per_s", "{:,.0f}", 12), ("MFU", "mfu", "{:.3f}", 6)]


def row(i: int, c: Candidate, p: Plan) -> dict:
    return {"rank": i + 1, "tp": c.tp, "ep": c.ep, "dp": p.shapes.layout.dp, "zero_stage": c.zero_stage,
            "recompute": c.recompute, "micro_batch_size": c.micro_batch_size, "grad_accum": c.grad_accum,
            "peak": p.memory.peak, "needed": p.memory.needed, "fits": "yes" if p.fits else "no",
            "step_s": p.time.total_s, "tokens_per_s": p.time.tokens_per_s, "mfu": p.time.mfu}


def search_text(plans: list[tuple[Candidate, Plan]], refused: dict[str, int], top: int, title: str) -> str:
    if not plans:
        return f"{title}: no valid layout; refused: {refused}"
    first = plans[0][1]
    s, hw = first.shapes, first.hw
    fitting = sum(p.fits for _, p in plans)
    lines = [f"{title}: {s.layout.world_size} GPUs ({s.gpus_per_node} per node), {hw.name}, "
             f"{hw.memory_gib:g} GiB each; routing imbalance {s.imbalance:g}",
             f"{len(plans)} layouts planned, {fitting} fit; ranked by fit, then modelled step time "
             "(a model: docs/planner.md)",
             text_table([row(i, c, p) for i, (c, p) in enumerate(plans[:top])], COLUMNS)]
    if refused:
        lines.append("refused by the trainer's checks: " + "; ".join(f"{n} x {why}" for why, n in refused.items()))
    return "\n".join(lines)


def search_dict(plans: list[tuple[Candidate, Plan]], refused: dict[str, int]) -> dict:
    return {"plans": [as_dict(p) for _, p in plans], "refused": refused}
