"""The planner against a GPU: moe-plan's figures beside what the trainer measures.

    python benchmarks/plan_vs_measured.py                 # CUDA: configs/gpu_moe_1b.yaml
    python benchmarks/plan_vs_measured.py -- --train.micro_batch_size=4
    python benchmarks/plan_vs_measured.py --smoke         # CPU: checks the harness only

Two measurements, side by side with the plan of the same config and layout:
1. the trainer's peak memory (torch.cuda.max_memory_allocated of the busiest rank over a few
   steps, from summary.json, where the trainer also keeps the plan's prediction); the issue's
   bound is 10%;
2. the activations one forward keeps for backward on this device
   (benchmarks/saved_tensors.saved_tensor_bytes), against planner/activations.py's inventory
   for CUDA kernels (the fused RMSNorm and attention), which the CPU tests cannot reach.
On CPU (--smoke) the trainer's peak is the process's resident set, interpreter included: the
row is printed, its ratio is not a check. Table on stdout, JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.single_process import add_arguments, launcher_args  # noqa: E402

MiB = float(1 << 20)


def trainer_peak(config: str, extra: list[str], steps: int, nproc: int) -> dict:
    """summary.json's measured peak and the plan the trainer made of its own run."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "launcher.train", "--config", config, *extra, f"--train.steps={steps}",
               "--train.eval_interval=0", "--checkpoint.save_final=false", "--logging.progress=false",
               "--logging.tensorboard=false", "--logging.heatmap_interval=0", f"--logging.run_dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the training run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    plan = summary["plan"]
    return {"quantity": f"peak memory ({summary['peak_memory_kind']}, busiest rank)",
            "planned": plan.get("peak_memory_bytes"), "measured": summary["peak_memory_bytes"],
            "checked": summary["peak_memory_kind"] == "cuda_max_allocated", "bound": 0.10}


def forward_activations(config: str, extra: list[str], smoke: bool) -> dict:
    """One forward's kept bytes in a world of one, against the plan of that run."""
    import torch

    from benchmarks.saved_tensors import saved_tensor_bytes
    from benchmarks.single_process import single_process
    from planner.activations import activations
    from planner.shapes import make_shapes

    with single_process(["--config", config, *extra, "--parallel.dp=1", "--parallel.ep=1",
                         "--parallel.tp=1"], smoke, 29517) as setup:
        model, batch = setup.model(), setup.batch()
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # as trainer/data.py gives them

        def forward():
            with setup.autocast():
                return model(x, y)

        held, _ = saved_tensor_bytes(forward, [*model.parameters(), *model.buffers()])
        s = make_shapes(setup.job, 1, device=setup.device.type)
        model = None  # the model goes before the cache is emptied
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"quantity": f"activations kept by one forward ({s.device}, {s.precision.name})",
            "planned": activations(s).total(s), "measured": held, "checked": True, "bound": 0.05}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="default 20 (smoke: 3)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for the training run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    config, extra = launcher_args(args)
    steps = args.steps or (3 if args.smoke else 20)
    rows = [forward_activations(config, extra, args.smoke), trainer_peak(config, extra, steps, args.nproc)]
    print(f"{config} {' '.join(extra)}")
    print(f"{'quantity':<58} {'planned MiB':>12} {'measured MiB':>13} {'measured/planned':>17}")
    for row in rows:
        row["ratio"] = row["measured"] / row["planned"]
        row["within_bound"] = abs(row["ratio"] - 1) <= row["bound"] if row["checked"] else None
        note = "" if row["checked"] else "  (not comparable: resident set)"
        print(f"{row['quantity']:<58} {row['planned'] / MiB:>12,.1f} {row['measured'] / MiB:>13,.1f} "
              f"{row['ratio']:>17.3f}{note}")
    if args.json:
        args.json.write_text(json.dumps({"config": config, "overrides": extra, "rows": rows}, indent=2))
    return 0 if all(r["within_bound"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
