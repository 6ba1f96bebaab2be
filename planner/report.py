"""A plan as text (every line is explained in docs/planner.md) and as JSON (`moe-plan --json`)."""

from __future__ import annotations

import dataclasses

from model.flops import model_cost
from planner.plan import Plan

GiB, MiB = float(1 << 30), float(1 << 20)


def size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024.0)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} B"


def layout_line(p: Plan) -> str:
    s, lay, tr = p.shapes, p.shapes.layout, p.shapes.job.train
    return (f"dp {lay.dp} x tp {lay.tp}, ep {lay.ep} (edp {lay.edp}); ZeRO {s.job.parallel.zero_stage}; "
            f"recompute {tr.recompute}; micro-batch {tr.micro_batch_size} x {tr.seq_len} tokens, "
            f"grad_accum {tr.grad_accum}; {s.precision.name} on {s.device}")


def memory_rows(p: Plan) -> list[tuple[str, float]]:
    m, s = p.memory, p.shapes
    st, a = m.states, m.acts
    rows = [(f"parameters ({s.precision.param * 8}-bit)", st.params), ("gradients", st.grads),
            ("optimizer state (AdamW moments, fp32)", st.optimizer)]
    if s.job.parallel.zero_stage in (1, 2):
        rows.append(("master weights (fp32, this rank's partition)", st.master))
    rows.append(("activations kept for backward, one micro-batch", m.activations))
    if s.moe_blocks:
        rows.append((f"  {s.moe_blocks} MoE blocks x {a.moe_block / MiB:,.1f} MiB", s.moe_blocks * a.moe_block))
    if s.dense_blocks:
        rows.append((f"  {s.dense_blocks} dense blocks x {a.dense_block / MiB:,.1f} MiB",
                     s.dense_blocks * a.dense_block))
    rows.append(("  embedding, final norm, output, loss", a.ends))
    if a.recompute_transient:
        rows.append(("one recomputed region, in backward", a.recompute_transient))
    rows.append(("all-to-all buffers (one MoE layer: N sent + R received rows)", m.a2a_buffers))
    for name, value in m.transients.items():
        if value and "all-to-all" not in name:
            rows.append((f"transient: {name}", value))
    rows += [(f"modelled peak ({m.peak_phase})", m.peak),
             ("allowance (1 GiB + 5%: CUDA context, NCCL, workspaces, fragmentation)", m.allowance),
             ("needed", m.needed)]
    return rows


def text(p: Plan, title: str) -> str:
    s, m, t, hw = p.shapes, p.memory, p.time, p.hw
    cost = model_cost(s.job.model, s.moe, s.job.train.seq_len)
    lines = [f"{title}: {s.layout.world_size} GPUs ({s.gpus_per_node} per node), {hw.name}",
             f"layout: {layout_line(p)}",
             *(f"note: {n}" for n in notes(p)),
             f"model: {cost.total_params / 1e9:,.3f} B parameters, {cost.activated_params / 1e9:,.3f} B "
             f"activated per token",
             "",
             f"memory per rank (rank {m.rank}, the busiest; routing imbalance {s.imbalance:g})",
             *(f"  {name:<72} {value / GiB:>9.3f} GiB" for name, value in memory_rows(p)),
             f"  fits in {hw.memory_gib:g} GiB: {'yes' if p.fits else 'NO'}",
             "",
             "communication per optimizer step (this rank)",
             f"  {'op':<14} {'group':<5} {'calls':>6} {'per call':>11} {'per step':>11}  {'via':<9} what"]
    for c in p.collectives:
        lines.append(f"  {c.op:<14} {c.group:<5} {c.count:>6} {size(c.nbytes):>11} "
                     f"{size(c.total):>11}  {c.via:<9} {c.what}")
    traffic = p.a2a_traffic()
    if any(traffic.values()):
        lines.append("  all-to-all bytes per step, uniform routing: " + ", ".join(
            f"{k} {size(v)}" for k, v in traffic.items()))
    lines.append("  every logging.log_interval steps: " + ", ".join(
        f"{c.op} {c.group} {size(c.nbytes)} ({c.what})" for c in p.log_collectives))
    lines += ["",
              "modelled step time (a model: the figures and assumptions are in docs/planner.md)",
              f"  compute        {t.compute_s * 1e3:10.1f} ms  (busiest rank, {hw.matmul_efficiency:.0%} of "
              f"{hw.peak_tflops:g} TFLOP/s)",
              f"  optimizer      {t.optimizer_s * 1e3:10.1f} ms  ({hw.hbm_tbps:g} TB/s HBM)",
              f"  communication  {t.comm_s * 1e3:10.1f} ms  exposed (NVLink {hw.intra_gbps:g} GB/s, "
              f"network {hw.inter_gbps:g} GB/s, x{hw.link_efficiency:g})"
              + (f"; {t.hidden_comm_s * 1e3:.1f} ms FSDP2 overlapped" if t.hidden_comm_s else ""),
              f"  step           {t.total_s * 1e3:10.1f} ms  {t.tokens_per_s:,.0f} tokens/s, MFU {t.mfu:.3f}"]
    return "\n".join(lines)


def notes(p: Plan) -> list[str]:
    """What the plan does not model for this job."""
    backend = p.shapes.moe.backend
    out = []
    if backend != "native":
        out.append(f"moe.backend {backend}: its activations and MoE collectives are planned as the "
                   "native backend's (only the native backend's are held to measurement)")
    if p.shapes.job.train.compile:
        out.append("train.compile: the eager kernels' activations are planned")
    return out


def as_dict(p: Plan) -> dict:
    s, m = p.shapes, p.memory
    lay = s.layout
    return {
        "world_size": lay.world_size, "gpus_per_node": s.gpus_per_node, "device": s.device,
        "hardware": dataclasses.asdict(p.hw),
        "layout": {"dp": lay.dp, "tp": lay.tp, "ep": lay.ep, "edp": lay.edp,
                   "zero_stage": s.job.parallel.zero_stage, "recompute": s.job.train.recompute,
                   "micro_batch_size": s.job.train.micro_batch_size, "grad_accum": s.micro_batches,
                   "seq_len": s.job.train.seq_len, "precision": s.precision.name},
        "imbalance": s.imbalance, "notes": notes(p),
        "memory": {"rank": m.rank, "params": m.states.params, "grads": m.states.grads,
                   "optimizer": m.states.optimizer, "master": m.states.master,
                   "activations": m.activations, "activations_per_moe_block": m.acts.moe_block,
                   "activations_per_dense_block": m.acts.dense_block, "activations_ends": m.acts.ends,
                   "recompute_transient": m.acts.recompute_transient, "a2a_buffers": m.a2a_buffers,
                   "transients": m.transients, "phases": m.phases, "peak": m.peak,
                   "peak_phase": m.peak_phase, "allowance": m.allowance, "needed": m.needed,
                   "fits": p.fits, "capacity": p.hw.memory_bytes},
        "collectives": [dataclasses.asdict(c) for c in p.collectives],
        "log_collectives": [dataclasses.asdict(c) for c in p.log_collectives],
        "a2a_traffic": p.a2a_traffic(),
        "step_time": {"compute_s": p.time.compute_s, "optimizer_s": p.time.optimizer_s,
                      "comm_s": p.time.comm_s, "hidden_comm_s": p.time.hidden_comm_s,
                      "total_s": p.time.total_s, "tokens_per_s": p.time.tokens_per_s,
                      "mfu": p.time.mfu, "modelled": True},
    }
