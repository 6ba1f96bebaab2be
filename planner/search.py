"""Every valid layout of a job on N GPUs, planned and ranked (`moe-plan --search`).

The candidates: tp dividing the heads, key/value heads and hidden sizes, within one node
(tensor parallelism's collectives sit between every pair of matmuls); ep dividing dp and the
experts; ZeRO stages 0-3; train.recompute none, ffn, full; and the micro-batch sizes that keep
the job's global batch (dp x micro_batch_size x grad_accum sequences) with a whole grad_accum.
Each is validated as the trainer validates it (a candidate the trainer would refuse is left
out) and planned. Ranked: those that fit first, then by modelled step time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from model.errors import ConfigError
from planner.hardware import Hardware
from planner.plan import Plan, make_plan

STAGES = (0, 1, 2, 3)
RECOMPUTE = ("none", "ffn", "full")


@dataclass(frozen=True)
class Candidate:
    tp: int
    ep: int
    zero_stage: int
    recompute: str
    micro_batch_size: int
    grad_accum: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def global_batch(job, gpus: int) -> int:
    """Sequences per optimizer step the job asks for, on `gpus` GPUs."""
    par, tr = job.parallel, job.train
    dp = par.dp if par.dp is not None else gpus // par.tp
    return dp * tr.micro_batch_size * tr.grad_accum


def candidates(job, gpus: int, gpus_per_node: int) -> list[Candidate]:
    batch = global_batch(job, gpus)
    out = []
    for tp in _divisors(min(gpus, gpus_per_node)):
        if gpus % tp:
            continue
        dp = gpus // tp
        if batch % dp:
            continue
        for ep in _divisors(dp):
            if job.moe.num_experts % ep:
                continue
            for mb in _divisors(batch // dp):
                for stage in STAGES:
                    for mode in RECOMPUTE:
                        out.append(Candidate(tp, ep, stage, mode, mb, batch // dp // mb))
    return out


def with_candidate(job, c: Candidate):
    new = copy.deepcopy(job)
    new.parallel.dp, new.parallel.tp, new.parallel.ep = None, c.tp, c.ep
    new.parallel.zero_stage = c.zero_stage
    new.train.recompute, new.train.micro_batch_size, new.train.grad_accum = (
        c.recompute, c.micro_batch_size, c.grad_accum)
    return new


def search(job, gpus: int, gpus_per_node: int, hw: Hardware, imbalance: float = 1.0,
           device: str = "cuda") -> tuple[list[tuple[Candidate, Plan]], dict[str, int]]:
    """(ranked plans, how many candidates were refused and why)."""
    plans, refused = [], {}
    for c in candidates(job, gpus, gpus_per_node):
        try:
            plans.append((c, make_plan(with_candidate(job, c), gpus, gpus_per_node, imbalance, device, hw)))
        except ConfigError as exc:
            reason = str(exc).split(":")[0][:80]
            refused[reason] = refused.get(reason, 0) + 1
    if not plans and not refused:
        raise ConfigError(f"no layout of {gpus} GPUs keeps the global batch of "
                          f"{global_batch(job, gpus)} sequences: give one divisible by dp")
    # Every candidate trains the same global batch: the step time compares them.
    plans.sort(key=lambda cp: (not cp[1].fits, cp[1].time.total_s))
    return plans, refused
