"""Preemption: SIGTERM or SIGUSR1 to any rank stops every rank at the same step, with a checkpoint.

The handler only records the signal. At the end of every step the loop reduces the flag over
the world (MAX of one int: one tiny collective per step, a host synchronisation on GPU), so
all ranks agree on the step to stop at even when only one rank was signalled. The loop then
saves a checkpoint, writes summary.json with `"stopped"`, and the process exits with
PREEMPTED_EXIT_CODE.

Where the signals come from: Slurm's `--signal=USR1@90` (to every task), `scancel --signal`,
or torchrun's agent, which forwards SIGTERM (and SIGUSR1 when TORCHELASTIC_SIGNALS_TO_HANDLE
lists it) to its workers and SIGKILLs them 30 s later: the save must fit in that window.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from parallel.collectives import all_reduce

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; slurm.conf RequeueExit=75 requeues on it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the job should be requeued."""


class StopSignals:
    """Installs the handlers (main thread only) and answers `should_stop()` collectively."""

    def __init__(self, device: torch.device):
        self.device, self.received, self._previous = device, None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True on every rank iff any rank has received a stop signal. Collective."""
        flag = torch.tensor([1 if self.received else 0], device=self.device)
        all_reduce(flag, None, dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
