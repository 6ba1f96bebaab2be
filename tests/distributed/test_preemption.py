"""Preemption through torchrun: a signal to one worker, or to the agent, stops every rank at
one step with a committed checkpoint and exit code 75; `resume=auto` continues from it.

1. SIGUSR1 to one worker (as `scancel --signal=USR1` or Slurm's `--signal` would deliver it).
2. After resuming, SIGTERM to the torchrun agent, which forwards it to its workers and kills
   them 30 s later: the checkpoint must be committed before that.
(2 ranks, dp 2 x ep 2.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from checkpoint.store import committed
from tests.distributed.launch import ROOT, SMALL, TINY, _env
from launcher.exit_codes import PREEMPTED as PREEMPTED_EXIT_CODE

ARGS = ["--config", TINY, *SMALL, "--parallel.dp=2", "--parallel.ep=2", "--train.eval_interval=2",
        "--logging.progress=false", "--logging.tensorboard=false", "--parallel.timeout_s=60"]


class Job:
    """torchrun in the background; its output collected by a thread so it never blocks."""

    def __init__(self, run_dir, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "launcher.train", *ARGS, f"--logging.run_dir={run_dir}", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise AssertionError(f"no {text!r} in the output:\n" + "".join(self.lines[-40:]))
            time.sleep(0.2)

    def workers(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.5)  # let the reader thread take the last lines
        return code


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.distributed
@pytest.mark.slow
def test_a_signal_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    job = Job(tmp_path, "--train.steps=100000")
    job.wait_for("eval loss")
    os.kill(job.workers()[1], signal.SIGUSR1)
    sent = time.monotonic()
    code = job.finish()
    print(f"SIGUSR1 to one worker -> all exited in {time.monotonic() - sent:.1f} s")
    output = "".join(job.lines)
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in output, output[-3000:]
    assert code != 0
    summary = _summary(tmp_path)
    step = summary["steps"]
    assert "SIGUSR1" in summary["stopped"] or "another rank" in summary["stopped"]
    assert [p.name for p in committed(tmp_path / "checkpoints")] == [f"step_{step:08d}"]
    assert "preempted: stopped on" in output

    job = Job(tmp_path, "--train.steps=100000", "--checkpoint.resume=auto")
    job.wait_for(f"resumed from {tmp_path / 'checkpoints' / f'step_{step:08d}'}")
    job.wait_for("eval loss")
    job.proc.send_signal(signal.SIGTERM)  # to the agent
    sent = time.monotonic()
    job.finish()
    elapsed = time.monotonic() - sent
    print(f"SIGTERM to the agent -> checkpoint saved and all exited in {elapsed:.1f} s "
          f"(save {_summary(tmp_path)['save_s']:.2f} s)")
    second = _summary(tmp_path)
    assert "SIGTERM" in second["stopped"] and second["steps"] > step
    assert committed(tmp_path / "checkpoints")[0].name == f"step_{second['steps']:08d}"
    assert elapsed < 30, "the agent SIGKILLs its workers 30 s after forwarding the signal"
