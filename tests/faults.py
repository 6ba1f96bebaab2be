"""The real entry point with a fault installed: `-m tests.faults` in place of
`-m launcher.train`, under torchrun as users run it. MOE_TEST_FAULT names the fault (parallel/
faults.py lists the points; production code only ever calls them):

    kill_in_save:RANK@STEP   that rank SIGKILLs itself right after writing its shard of the
                             checkpoint of STEP, before the commit
    crash_after:RANK@STEP    that rank exits abruptly (code 13) after STEP, in a job's first
                             attempt only (torchrun's TORCHELASTIC_RESTART_COUNT 0 or unset)
    nan_grads:RANK@STEP      that rank's gradients become NaN after backward in STEP
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from launcher.train import main
from parallel.faults import install

FAULT_ENV = "MOE_TEST_FAULT"


def hook_for(spec: str):
    kind, _, where = spec.partition(":")
    rank, step = (int(v) for v in where.split("@"))
    points = {"kill_in_save": "checkpoint.shard_written", "crash_after": "train.step_done",
              "nan_grads": "train.grads_ready"}
    if kind not in points:
        raise SystemExit(f"{FAULT_ENV}={spec!r}: unknown fault {kind!r}; known: {sorted(points)}")

    def hook(name, **at):
        if name != points[kind] or (at["rank"], at["step"]) != (rank, step):
            return
        if kind == "kill_in_save":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "crash_after" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os._exit(13)
        elif kind == "nan_grads":
            with torch.no_grad():
                for p in at["model"].parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))

    return hook


if __name__ == "__main__":
    install(hook_for(os.environ[FAULT_ENV]))
    sys.exit(main())
