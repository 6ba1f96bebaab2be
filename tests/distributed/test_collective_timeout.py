"""A collective that cannot complete becomes an error on the waiting ranks within
parallel.timeout_s, naming its process group, instead of a hang.

1. In-process (2 gloo ranks): rank 1 never joins; rank 0's MoE all-to-all on the ep group
   and its stop-flag all-reduce on the world fail after the group's timeout, each naming the
   group and its ranks. Subgroups get the timeout too (torch would give them 30 minutes).
2. Through torchrun: one worker of a training job is frozen with SIGSTOP; the other exits with
   code 3 and a message naming the group, within the configured timeout.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch

from tests.distributed.spawn import run_distributed
from tests.distributed.test_preemption import Job

TIMEOUT_S = 2.0


def _stalled_peer(rank, world_size):
    from parallel.collectives import (
        CollectiveError,
        ProcessGroupExpertComm,
        all_reduce,
        all_to_all_single,
    )
    from parallel.topology import Layout, Topology

    topo = Topology.create(Layout(world_size=2, dp=2, ep=2), timeout_s=TIMEOUT_S)
    out = {}
    # Bad arguments fail on each rank before anything is sent: named, but not blamed on a peer.
    with pytest.raises(CollectiveError) as info:
        all_to_all_single(torch.empty(4), torch.zeros(3), [2, 2], [2, 2], topo.groups["ep"])
    out["bad splits"] = str(info.value)
    if rank == 1:
        time.sleep(3 * TIMEOUT_S)  # joins nothing; exits after rank 0 has given up twice
        return out
    comm = ProcessGroupExpertComm(topo.groups["ep"])
    for name, op in (("ep", lambda: comm.exchange_counts(torch.zeros(2, 4, dtype=torch.long))),
                     ("world", lambda: all_reduce(torch.zeros(3, dtype=torch.long)))):
        start = time.monotonic()
        with pytest.raises(CollectiveError) as info:
            op()
        out[name] = (str(info.value), time.monotonic() - start)
    return out


@pytest.mark.distributed
def test_a_stalled_peer_fails_the_collective_naming_its_group():
    # The world group's timeout is larger, so only the subgroup's own timeout ends the wait.
    results = run_distributed(_stalled_peer, 2, timeout_s=60)
    for rank, result in enumerate(results):
        msg = result.pop("bad splits")
        assert f"all_to_all on process group ep (global ranks [0, 1]) failed on global rank {rank}" in msg, msg
        assert "Not a transport failure" in msg and "died" not in msg, msg
    failures = results[0]
    msg, waited = failures["ep"]
    assert "all_to_all on process group ep (global ranks [0, 1]) failed on global rank 0" in msg, msg
    assert "parallel.timeout_s" in msg
    assert TIMEOUT_S * 0.9 < waited < TIMEOUT_S + 3, waited
    msg, waited = failures["world"]
    assert "all_reduce on process group world (global ranks 0..1)" in msg, msg
    assert waited < 60 + 3


def _wait_exit(pid: int, timeout: float = 20) -> None:
    """Until `pid` has exited (gone, or a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    raise AssertionError(f"worker {pid} still running {timeout} s after its collective failed")


@pytest.mark.distributed
@pytest.mark.slow
def test_a_frozen_worker_ends_the_job_with_an_error_naming_the_group(tmp_path):
    job = Job(tmp_path, "--train.steps=100000", "--parallel.timeout_s=4")
    job.wait_for("eval loss")
    alive, frozen = job.workers()
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        job.wait_for("failed on global rank 0", timeout=60)
        waited = time.monotonic() - stopped
        _wait_exit(alive)
        time.sleep(1.0)  # the agent records rank 0's own exit code first
    finally:
        os.kill(frozen, signal.SIGKILL)  # the agent's SIGTERM would wait for a SIGCONT
    job.finish()
    output = "".join(job.lines)
    line = next(x for x in output.splitlines() if "failed on global rank 0" in x)
    print(f"worker 1 frozen -> rank 0 failed after {waited:.1f} s: {line[:200]}")
    assert re.search(r"^collective failure: \w+ on process group (dp|ep|edp|tp|world) \(global ranks", line), line
    # rank 0 reads the heartbeats (parallel/heartbeat.py): the frozen worker is named
    assert re.search(rf"rank 1 \(host [^,]+, pid {frozen}\) stopped answering", output), output[-3000:]
    assert waited < 4 + 10, waited
    assert "exitcode  : 3" in output, output[-3000:]
