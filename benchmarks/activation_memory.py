"""What train.recompute buys and costs: activation memory and forward + backward time, per mode.

    python benchmarks/activation_memory.py                 # GPU: configs/gpu_moe_1b.yaml
    python benchmarks/activation_memory.py -- --moe.backend=deepspeed
    python benchmarks/activation_memory.py --smoke         # CPU: a tiny model
    python benchmarks/activation_memory.py -- --model.n_layers=2 --train.micro_batch_size=1

For each mode (none, ffn, full), side by side in one run, on the config's model in a world of
one as the trainer builds it, one fixed batch:
- held: the bytes the forward leaves for its backward (benchmarks/saved_tensors.held_bytes:
  every storage made during the forward and alive after it, parameters aside; storage bytes,
  not the CUDA allocator's rounded blocks). train.compile is set aside for it: only eager
  operations are seen.
- fwd+bwd: the median time of forward + backward (no optimizer step), after warmup.
- peak (CUDA): the allocator's peak over a timed step, parameters and gradients included.
Ratios are to mode none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.single_process import add_arguments, launcher_args  # noqa: E402
from trainer.metrics import text_table  # noqa: E402

MODES = ("none", "ffn", "full")
COLUMNS = [("recompute", "mode", "{}", 9), ("held MiB", "held_mib", "{:.1f}", 10),
           ("/none", "held_ratio", "{:.3f}", 7), ("fwd+bwd ms", "step_ms", "{:.1f}", 11),
           ("/none", "time_ratio", "{:.3f}", 7), ("peak GiB", "peak_gib", "{:.2f}", 9)]


def measure(setup, warmup: int, steps: int) -> dict:
    """One mode: the bytes one eager forward leaves for its backward, then (compiled if
    train.compile, in place) the median forward + backward time after `warmup` steps and the
    CUDA peak over the timed ones. One model per mode: building 1.7 B parameters takes a while."""
    from benchmarks.saved_tensors import held_bytes

    compile_, setup.job.train.compile = setup.job.train.compile, False
    model = setup.model()
    setup.job.train.compile = compile_
    batch = setup.batch()

    def forward():
        # Autocast ends inside: its cache of bf16 weight copies goes with it, as in training.
        with setup.autocast():
            return model(batch[:, :-1], batch[:, 1:])

    held, out = held_bytes(forward, [*model.parameters(), *model.buffers(), batch])
    out.loss.backward()
    del out
    if compile_:
        model.compile_modules()
    cuda = setup.device.type == "cuda"

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with setup.autocast():
            loss = model(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        if cuda:
            torch.cuda.synchronize(setup.device)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated(setup.device) / 2**30 if cuda else None
    return {"held_bytes": held, "held_mib": held / 2**20, "step_ms": statistics.median(times) * 1e3,
            "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    config, extra = launcher_args(args)

    from benchmarks.single_process import single_process

    rows = []
    with single_process(["--config", config, *extra], args.smoke, 29513) as setup:
        job = setup.job
        tokens = job.train.micro_batch_size * job.train.seq_len
        print(f"{config} {' '.join(extra)}\n{setup.device}, {tokens} tokens per forward, "
              f"{job.model.n_layers} blocks, moe.backend {job.moe.backend}, compute {setup.dtype}"
              f"{' (autocast)' if setup.autocast_bf16 else ''}", flush=True)
        for mode in args.modes:
            job.train.recompute = mode
            print(f"recompute {mode} ...", flush=True)
            rows.append({"mode": mode} | measure(setup, args.warmup, args.steps))
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
    base = next((r for r in rows if r["mode"] == "none"), rows[0])
    for row in rows:
        row["held_ratio"] = row["held_bytes"] / base["held_bytes"]
        row["time_ratio"] = row["step_ms"] / base["step_ms"]
    print(text_table(rows, COLUMNS))
    if args.json:
        args.json.write_text(json.dumps({"config": config, "overrides": extra, "device": str(setup.device),
                                         "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
