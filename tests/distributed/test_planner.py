"""The planner against the trainer: one real step per layout on 4 gloo ranks, measured
(tests/distributed/planner_measure.py), beside the plan of that rank.

Each rank's plan is made with that rank's own routing (the rows its experts received over
the mean), so the comparison is per rank, not just for the busiest. Held:
- parameters, gradients (as the optimizer step reads them), AdamW's moments and ZeRO's fp32
  master weights: exactly, on every rank (at ZeRO 1-2 they differ by rank);
- activations kept for backward, each micro-batch: exactly (the issue asks within 5%; on CPU
  the inventory names every storage, so any difference is a missing or extra entry);
- collectives: every (kind, group, bytes per call) with its number of calls exactly, the
  all-to-alls by their calls and total bytes (their rows per call follow each layer's
  routing, which the plan averages), for ours (parallel/collectives.count_collectives) and
  for everything, DeepSpeed's included, counted at torch.distributed's c10d level.
The cases of the module share one set of processes; each reports on its own.
"""

from __future__ import annotations

import collections

import pytest

from launcher.config import load_config
from planner.activations import activations
from planner.comms import per_step
from planner.memory import memory_plan
from planner.model_states import model_states
from planner.shapes import make_shapes
from tests.distributed.ckpt_setup import LAYOUTS, SMALL
from tests.distributed.spawn import run_cases

pytestmark = pytest.mark.distributed

WORLD, PER_NODE = 4, 2
CASES = {  # name -> (a layout of ckpt_setup, more overrides); every one has a shared expert
    "dp4_ep4": ("dp4_ep4", ()),
    "dp2_tp2_ep2": ("dp2_tp2_ep2", ()),
    "dp4_ep2_zero1_accum2": ("dp4_ep2", ("--parallel.zero_stage=1", "--train.grad_accum=2")),
    "dp4_ep2_zero2_accum2": ("dp4_ep2_zero2", ("--train.grad_accum=2",)),
    "dp2_tp2_ep2_zero2": ("dp2_tp2_ep2_zero2", ()),
    "dp4_ep4_recompute_ffn": ("dp4_ep4", ("--train.recompute=ffn",)),
    "dp2_tp2_ep2_full_qkproj_bias": ("dp2_tp2_ep2", ("--train.recompute=full", "--model.qk_norm=proj",
                                                     "--moe.bias_update_rate=0.01", "--moe.first_k_dense=1")),
    # 6 experts: the router's 6 rows do not split evenly over dp 4, so FSDP2 pads some shards
    "dp4_ep2_zero3_uneven": ("dp4_ep2", ("--parallel.zero_stage=3", "--moe.num_experts=6")),
    "dp2_tp2_ep2_zero3_accum2_tied": ("dp2_tp2_ep2", ("--parallel.zero_stage=3", "--train.grad_accum=2",
                                                      "--model.tie_embeddings=true")),
    "dp4_ep4_zero3_accum2_scatter_each": ("dp4_ep4", ("--parallel.zero_stage=3", "--train.grad_accum=2",
                                                      "--parallel.fsdp_reduce_every_micro_batch=true")),
}


def _measure(rank, world, root, name):
    from tests.distributed.planner_measure import measure_step

    layout, extra = CASES[name]
    return measure_step(rank, f"{root}/{name}", layout, extra)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("planner"))
    results = run_cases(_measure, WORLD, [(root, name) for name in CASES], timeout_s=600)
    return {name: results[(root, name)] for name in CASES}


def job_of(name: str):
    layout, extra = CASES[name]
    return load_config(["--config", "configs/cpu_tiny.yaml", *SMALL, *LAYOUTS[layout], *extra])


def shapes_of(job, recv_rows: int, micro_batches: int):
    """The plan's view of a rank whose experts received `recv_rows` over `micro_batches`."""
    s = make_shapes(job, WORLD, PER_NODE, 1.0, "cpu")
    if s.layout.ep == 1 or not s.moe_blocks:
        return s
    return make_shapes(job, WORLD, PER_NODE, recv_rows / (s.sent_rows * s.moe_blocks * micro_batches), "cpu")


def summary(calls) -> tuple[collections.Counter, dict]:
    """(count of each (op, group, bytes) but all-to-alls, {group: [calls, bytes]} of those)."""
    exact, a2a = collections.Counter(), {}
    for op, group, nbytes, count in calls:
        if op == "all_to_all":
            entry = a2a.setdefault(group, [0, 0.0])
            entry[0] += count
            entry[1] += nbytes * count
        else:
            assert nbytes == int(nbytes), (op, group, nbytes)
            exact[(op, group, int(nbytes))] += count
    return exact, {g: [n, round(b)] for g, (n, b) in a2a.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_equals_measurement(measured, name):
    ranks = measured[name]
    if isinstance(ranks, AssertionError):  # that case failed in the workers: their tracebacks
        raise ranks
    job = job_of(name)
    # The trainer's own plan (printed at start, kept in summary.json) is the planner's.
    own = memory_plan(make_shapes(job, WORLD, WORLD, 1.0, "cpu"))
    assert {k: ranks[0]["trainer_plan"][k] for k in ("grads_bytes", "activations_bytes",
                                                     "peak_memory_bytes", "busiest_rank")} == {
        "grads_bytes": own.states.grads, "activations_bytes": own.activations,
        "peak_memory_bytes": own.peak, "busiest_rank": own.rank}
    for rank, got in enumerate(ranks):
        s = shapes_of(job, sum(got["recv_rows"]), len(got["recv_rows"]))
        states = model_states(s, rank)
        assert (got["params"], got["grads"], got["optimizer"], got["master"]) == (
            states.params, states.grads, states.optimizer, states.master), f"rank {rank}"
        for micro, (held, rows) in enumerate(zip(got["activations"], got["recv_rows"])):
            planned = activations(shapes_of(job, rows, 1)).total(shapes_of(job, rows, 1))
            # Exact: the inventory names every storage the CPU kernels keep (the issue asks
            # 5%, the bound for kernels it cannot measure here).
            assert round(planned) == held, (f"rank {rank} micro-batch {micro}: planned "
                                            f"{planned:.0f} B kept, measured {held} B")
        plan = per_step(s)
        ours = [(c.op, c.group, c.nbytes, 1) for c in got["ours"]]
        planned_ours = [(c.op, c.group, c.nbytes, c.count) for c in plan if c.via == "ours"]
        assert summary(ours) == summary(planned_ours), f"rank {rank}: our collectives"
        every = [(c.op, c.group, c.nbytes, 1) for c in got["all"]]
        assert summary(every) == summary([(c.op, c.group, c.nbytes, c.count) for c in plan]), \
            f"rank {rank}: every collective (c10d level)"

