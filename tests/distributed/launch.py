"""Run the real entry point as users do: torchrun around `python -m launcher.train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/cpu_tiny.yaml"
# A few-second model for the tests that check plumbing rather than learning.
SMALL = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--moe.expert_hidden=32",
         "--train.micro_batch_size=2", "--train.seq_len=32", "--train.eval_batches=2"]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def torchrun(nproc: int, *args: str, timeout: float = 300, fault: str | None = None,
             runner: str = "torch.distributed.run", **env: str) -> subprocess.CompletedProcess:
    """torchrun's own options (--max-restarts=...) may lead `args`; the rest go to the job.
    `fault` (tests/faults.py) runs the entry point with that fault installed; `runner`
    launcher.agent runs our torchrun wrapper instead of torchrun."""
    agent = [a for a in args if a.startswith("--max-restarts")]
    entry = "launcher.train" if fault is None else "tests.faults"
    if fault is not None:
        env["MOE_TEST_FAULT"] = fault
    cmd = [sys.executable, "-m", runner, f"--nproc_per_node={nproc}", *agent,
           "--standalone", "-m", entry, *[a for a in args if a not in agent]]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)
