"""The plan of the run the launcher is about to train: printed at start, kept in summary.json.

The trainer's own layout, device and precision; balanced routing (imbalance 1) and the
hardware preset (peak memory is compared, not step time, unless the GPU is one the presets
describe). A planner failure never stops training: the reason is reported instead.
"""

from __future__ import annotations

import os

from model.errors import ConfigError

GiB = float(1 << 30)


def run_plan(job, world_size: int, device_type: str) -> dict:
    """The plan's figures for this run, or {"unavailable": why}."""
    from planner.plan import make_plan

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    try:
        plan = make_plan(job, world_size, per_node, 1.0, "cuda" if device_type == "cuda" else "cpu")
    except (ConfigError, ValueError) as exc:  # never in the way of training
        return {"unavailable": str(exc)}
    m = plan.memory
    return {"params_bytes": m.states.params, "grads_bytes": m.states.grads,
            "optimizer_bytes": m.states.optimizer, "master_bytes": m.states.master,
            "activations_bytes": m.activations, "peak_memory_bytes": m.peak, "peak_phase": m.peak_phase,
            "needed_bytes": m.needed, "busiest_rank": m.rank,
            "modelled_step_time_s": plan.time.total_s, "modelled_mfu": plan.time.mfu,
            "collectives_per_step": sum(c.count for c in plan.collectives),
            "collective_bytes_per_step": sum(c.total for c in plan.collectives)}


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def describe(plan: dict) -> str:
    if "unavailable" in plan:
        return f"plan: unavailable ({plan['unavailable']})"
    return (f"plan (moe-plan, busiest rank {plan['busiest_rank']}): parameters "
            f"{_size(plan['params_bytes'])}, gradients {_size(plan['grads_bytes'])}, optimizer "
            f"{_size(plan['optimizer_bytes'])}, master {_size(plan['master_bytes'])}, activations "
            f"{_size(plan['activations_bytes'])}; modelled peak {_size(plan['peak_memory_bytes'])} "
            f"({plan['peak_phase']}); {plan['collectives_per_step']} collectives, "
            f"{_size(plan['collective_bytes_per_step'])} per step")
