"""Where one training step of a config goes: the top operations by device time, per step.

    python benchmarks/profile_step.py                                  # GPU: configs/gpu_moe_1b.yaml
    python benchmarks/profile_step.py -- --moe.backend=megablocks --train.micro_batch_size=4
    python benchmarks/profile_step.py --smoke                          # CPU: a tiny model

The step is the trainer's own (launcher config, Topology, build_stepper, autocast as
trainer.loop does) in a world of one, on one fixed batch: `--warmup` untimed steps, `--steps`
timed with CUDA events (wall clock on CPU), then `--profile-steps` under torch.profiler. It
prints the median step time, the model FLOP/s it implies (model/flops.py's count, the one MFU
uses), and the operations ranked by their own device time, with forward, backward and the
optimizer as regions. For tuning, not for comparing: the figures to compare come from
benchmarks/e2e.py and benchmarks/moe_layer.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.single_process import add_arguments, launcher_args  # noqa: E402
from trainer.metrics import text_table  # noqa: E402

COLUMNS = [("  operation", "op", "  {}", 48), ("ms/step", "ms_per_step", "{:.3f}", 9),
           ("share", "share", "{:.3f}", 7), ("calls/step", "calls_per_step", "{:.0f}", 11)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    config, extra = launcher_args(args)

    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.moe_layer import rank_ops
    from benchmarks.single_process import single_process
    from model.flops import model_cost
    from trainer.optim import build_stepper, lr_at

    with single_process(["--config", config, *extra], args.smoke, 29512) as setup:
        job, device = setup.job, setup.device
        model = setup.model()
        stepper = build_stepper(model, setup.topology, job.train, job.parallel.zero_stage, local_rank=0,
                                dtype=setup.dtype)
        B, S = job.train.micro_batch_size, job.train.seq_len
        batch = setup.batch()

        def step(i: int) -> None:
            stepper.begin(lr_at(i, job.train))
            with record_function("forward"), setup.autocast():
                out = stepper.forward(batch[:, :-1], batch[:, 1:])
            with record_function("backward"):
                stepper.backward(out.loss)
            with record_function("optimizer"):
                stepper.finish()
                stepper.update()

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for i in range(args.warmup):
            step(i)
        sync()
        times = []
        for i in range(args.steps):
            began = time.perf_counter()
            step(args.warmup + i)
            sync()
            times.append(time.perf_counter() - began)
        seconds = statistics.median(times)
        tokens = B * S
        model_flops = model_cost(job.model, job.moe, S).flops_per_token * tokens
        print(f"{config} {' '.join(extra)}\n{device}, {tokens} tokens/step: median step "
              f"{seconds * 1e3:.1f} ms, {tokens / seconds:,.0f} tokens/s, "
              f"{model_flops / seconds / 1e12:.1f} model TFLOP/s")

        cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for i in range(args.profile_steps):
                step(i)
            sync()
        n = args.profile_steps
        regions = ("forward", "backward", "optimizer")
        for e in prof.key_averages():
            if e.key in regions:
                print(f"  {e.key}: {e.cpu_time_total / 1e3 / n:.1f} ms/step on the host"
                      + (f", {e.device_time_total / 1e3 / n:.1f} ms of device time" if cuda else ""))
        rows, total = rank_ops(prof, cuda, n, args.top, exclude=regions)
        print(f"  device busy {total / 1e3 / n:.1f} ms/step of {seconds * 1e3:.1f} ms")
        for row in rows:
            row["op"] = row["op"][:48]
        print(text_table(rows, COLUMNS))
        return 0


if __name__ == "__main__":
    sys.exit(main())
