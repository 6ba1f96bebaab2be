"""End-to-end training speed for each MoE backend: the README's training command, one after
another, and the numbers each run's summary.json reports.

    python benchmarks/e2e.py                        # GPU: configs/gpu_moe_1b.yaml, 300 steps
    python benchmarks/e2e.py --backend native --steps 100 -- --train.micro_batch_size=4
    python benchmarks/e2e.py --backend native --variant eager --variant compile=--train.compile=true
    python benchmarks/e2e.py --smoke                # CPU: a few steps of a small model (checks the harness)

Each backend runs `torchrun --standalone --nproc_per_node=N -m launcher.train --config C
--moe.backend=B --train.steps=S` in its own run dir (runs/bench/e2e_<backend>). Each
`--variant NAME=OVERRIDES` runs every backend once more with those launcher overrides (e.g.
torch.compile, ZeRO-1's bf16 weights), so the rows to compare come from one invocation, one
after another on the same machine (run dir e2e_<backend>_<NAME>). The trainer
measures (trainer/loop.py): steady-state training tokens/s (warm-up steps, evaluation and
checkpoints left out), MFU (model/flops.py: 6 x activated parameters + causal attention per
token, over 989 TFLOP/s per H100/H200 in bf16, or `--peak-tflops`), the busiest rank's peak
memory, the final held-out loss. A backend that cannot run here (megablocks without CUDA) is
listed as skipped with the reason; a failed run shows the end of its log. Table on stdout,
JSON in runs/bench/e2e.json, with each run's held-out loss curve (`evals`, also read from the
log of a run that failed or was cut off). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.sweep import log_tail, read_summary  # noqa: E402
from trainer.metrics import text_table  # noqa: E402

BACKENDS = ("native", "megablocks", "deepspeed")
SMOKE_ARGS = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--moe.expert_hidden=32",
              "--train.micro_batch_size=2", "--train.seq_len=32", "--train.eval_batches=2",
              "--train.eval_interval=0", "--logging.tensorboard=false", "--parallel.dp=1",
              "--parallel.ep=1"]


def skip_reason(backend: str) -> str | None:
    if backend != "megablocks":
        return None
    import torch

    from model.moe.megablocks_backend import why_unavailable

    return why_unavailable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def evals_in_log(path: Path) -> list[dict]:
    """The held-out losses a run printed before it failed or was cut off: the curve to compare
    with the other backends' (a finished run's summary.json has them as `evals`)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return [{"step": int(step), "eval_loss": float(loss)}
            for step, loss in re.findall(r"step (\d+): eval loss ([0-9.]+)", text)]


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the process's session (its workers), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME=--a=1 --b=2' -> ('NAME', ['--a=1', '--b=2']); 'NAME' alone adds nothing."""
    name, _, overrides = text.partition("=")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise SystemExit(f"e2e.py: --variant {text!r}: its name ({name!r}) must be letters, digits "
                         "or _.+- (it names the run dir)")
    return name, overrides.split()


def run_backend(backend: str, args, extra: list[str], out: Path, variant: str = "",
                overrides: tuple[str, ...] | list[str] = ()) -> dict:
    label = {"backend": backend} | ({"variant": variant, "overrides": list(overrides)} if variant else {})
    label["run"] = f"{backend}:{variant}" if variant else backend
    why = skip_reason(backend)
    if why:
        return label | {"status": f"skipped: {why}"}
    run_dir = out / (f"e2e_{backend}_{variant}" if variant else f"e2e_{backend}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "launcher.train", "--config", args.config,
           f"--moe.backend={backend}", f"--train.steps={args.steps}", "--logging.progress=false",
           "--checkpoint.save_final=false", *extra, *overrides, f"--logging.run_dir={run_dir}"]
    if args.peak_tflops:
        cmd.append(f"--logging.peak_tflops={args.peak_tflops}")
    with open(run_dir / "launch.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        # A hung run (a stuck collective) must not take the whole GPU session with it. torchrun
        # gets a session of its own so a timeout kills its workers too: killing torchrun alone
        # left the worker holding 49 GiB of the GPU, and the next backend ran out of memory.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            code = f"timeout after {args.timeout} s"
        finally:
            _kill_session(proc)
    summary = read_summary(run_dir)
    if code or summary is None:
        path, tail = log_tail(run_dir, 12)
        print(f"{label['run']}: failed (exit {code}); end of {path}:\n    " + "\n    ".join(tail),
              file=sys.stderr)
        return label | {"status": f"failed (exit {code})", "run_dir": str(run_dir),
                "evals": evals_in_log(run_dir / "launch.log")}
    keys = ("train_tokens_per_s", "step_time_s", "mfu", "peak_memory_bytes", "peak_memory_kind",
            "final_eval_loss", "flops_per_token", "activated_params", "total_params", "device",
            "peak_tflops_per_device", "world_size", "evals")
    return label | {"status": "ok", "run_dir": str(run_dir)} | {k: summary.get(k) for k in keys}


E2E_COLUMNS = [("run", "run", "{}", 22), ("tokens/s", "train_tokens_per_s", "{:,.0f}", 12),
               ("step ms", "step_time_s", "{:.1f}", 9, 1e3), ("MFU", "mfu", "{:.3f}", 7),
               ("peak GiB", "peak_memory_bytes", "{:.2f}", 10, 2**-30),
               ("eval loss", "final_eval_loss", "{:.4f}", 11), ("  status", "status", "  {}", 0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--config", default=None, help="default configs/gpu_moe_1b.yaml (smoke: cpu_tiny)")
    parser.add_argument("--steps", type=int, default=None, help="default 300 (smoke: 6)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine")
    parser.add_argument("--peak-tflops", type=float, help="per device, for MFU where the GPU is not known")
    parser.add_argument("--smoke", action="store_true", help="a few steps of a small model on CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per backend's run before it is killed (default: none)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[=OVERRIDES]",
                        help="run every backend once per variant, with these launcher overrides "
                             "(space-separated, quoted as one argument); default: one run each")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more launcher.train overrides")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    if args.smoke:
        args.config = args.config or "configs/cpu_tiny.yaml"
        args.steps = args.steps or 6
        extra = SMOKE_ARGS + extra
    args.config = args.config or "configs/gpu_moe_1b.yaml"
    args.steps = args.steps or 300
    variants = [parse_variant(v) for v in args.variant] or [("", [])]
    if len({name for name, _ in variants}) < len(variants):
        raise SystemExit(f"e2e.py: two --variant share a name: {args.variant}")
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for backend in args.backend:
        for variant, overrides in variants:
            print(f"{backend}{':' + variant if variant else ''}: {args.steps} steps of {args.config} "
                  f"{' '.join(overrides)}...", file=sys.stderr, flush=True)
            rows.append(run_backend(backend, args, extra, args.out, variant, overrides))
            (args.out / "e2e.json").write_text(json.dumps(
                {"config": args.config, "steps": args.steps, "extra": extra, "rows": rows}, indent=1))
    print(text_table(rows, E2E_COLUMNS))
    print(f"wrote {args.out / 'e2e.json'}")
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
