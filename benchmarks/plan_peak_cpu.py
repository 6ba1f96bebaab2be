"""The planner's modelled peak against the live bytes of a real step, on CPU, stages 0-3.

    python benchmarks/plan_peak_cpu.py                   # 4 gloo ranks, dp 4, ep 2
    python benchmarks/plan_peak_cpu.py --ep 4 --stages 0 3

Each rank builds configs/cpu_tiny.yaml's model (micro-batch 2 x 32 tokens) at each ZeRO
stage as the trainer does and takes two steps through its Stepper under torch.profiler with
profile_memory (as benchmarks/zero_memory.py counts): the peak is the most bytes live during
the second step, every CPU allocation since the model was built included. Beside it, the
plan's modelled peak of that layout (planner/memory.py, device cpu) and the phase it names.
Nothing is asserted: the peak is a model; the exact figures are tests/distributed/test_planner.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ["--config", str(ROOT / "configs/cpu_tiny.yaml"), "--parallel.dp=null",
        "--train.micro_batch_size=2", "--train.seq_len=32"]


def _step_peak(rank: int, world: int, ep: int, stage: int) -> tuple[int, str]:
    """(the most bytes live in the second step, the region it was in)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from launcher.config import load_config
    from launcher.train import build_model
    from parallel.topology import Topology
    from trainer.optim import build_stepper

    job = load_config(BASE + [f"--parallel.ep={ep}", f"--parallel.zero_stage={stage}"])
    topology = Topology.create(job.validate(world))
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(rank))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model(job, topology, torch.device("cpu"))
        stepper = build_stepper(model, topology, job.train, stage, rank)
        for step in range(2):
            with record_function(f"step{step}"):
                stepper.begin(1e-3)
                with record_function("forward"):
                    out = stepper.forward(x, y)
                with record_function("backward"):
                    stepper.backward(out.loss)
                with record_function("step"):
                    stepper.finish()
                    stepper.update()
    events = prof.profiler.kineto_results.events()
    spans = {e.name(): (e.start_ns(), e.end_ns()) for e in events
             if e.name() in ("step1", "forward", "backward", "step")}
    start, end = spans["step1"]
    live = peak = 0
    at = start
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if e.start_ns() > end:
            break
        live += e.nbytes()
        if e.start_ns() >= start and live > peak:
            peak, at = live, e.start_ns()
    where = next((n for n, (a, b) in spans.items() if n != "step1" and a <= at <= b), "?")
    return peak, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args(argv)

    from launcher.config import load_config
    from planner.memory import memory_plan
    from planner.shapes import make_shapes
    from tests.distributed.spawn import run_distributed

    print(f"{'stage':>5} {'measured MB (busiest rank)':>27} {'in':>9} {'planned MB':>11} {'phase':>26} {'planned/measured':>17}")
    for stage in args.stages:
        ranks = run_distributed(_step_peak, args.world, (args.ep, stage), timeout_s=600)
        measured, where = max(ranks)
        job = load_config(BASE + [f"--parallel.ep={args.ep}", f"--parallel.zero_stage={stage}"])
        plan = memory_plan(make_shapes(job, args.world, args.world, device="cpu"))
        print(f"{stage:>5} {measured / 1e6:>27.3f} {where:>9} {plan.peak / 1e6:>11.3f} "
              f"{plan.peak_phase:>26} {plan.peak / measured:>17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
