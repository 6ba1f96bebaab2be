"""`python -m launcher.simulate`: 2 simulated nodes x 2 processes, one torchrun agent each.

The ranks land by node (0, 1 on node 0; 2, 3 on node 1) with local ranks 0 and 1 on each and
train; a SIGUSR1 to the simulator reaches every agent and worker, and the job stops with a
checkpoint and exit code 75, as a Slurm preemption would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from checkpoint.store import committed
from tests.distributed.launch import ROOT, SMALL, TINY, _env
from launcher.exit_codes import PREEMPTED as PREEMPTED_EXIT_CODE


def _simulate(run_dir, *args):
    cmd = [sys.executable, "-m", "launcher.simulate", "--nodes", "2", "--nproc-per-node", "2", "--",
           "--config", TINY, *SMALL, "--parallel.ep=2", "--logging.progress=false",
           "--logging.tensorboard=false", f"--logging.run_dir={run_dir}", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_simulated_nodes_place_ranks_by_node_and_forward_preemption(tmp_path):
    proc = _simulate(tmp_path, "--train.steps=100000", "--train.eval_interval=2")
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any("eval loss" in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines[-30:])
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE, "".join(lines[-30:])
    time.sleep(0.5)
    out = "".join(lines)
    placement = json.loads((tmp_path / "placement.json").read_text())
    assert [(p["rank"], p["node"], p["local_rank"]) for p in placement] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert "[node 0] placement: node 0: ranks [0, 1]; node 1: ranks [2, 3]" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "SIGUSR1" in summary["stopped"]
    assert committed(tmp_path / "checkpoints")[0].name == f"step_{summary['steps']:08d}"
