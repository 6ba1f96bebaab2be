"""Stop signals: SIGTERM, SIGUSR1 (preemption) or SIGINT (Ctrl-C) to any rank stops every rank
at the same step, with a checkpoint.

The handler only records the signal. Once per step the loop reduces the flag over the world
together with the step's divergence check (trainer/divergence.py: one small all-reduce, the
step's one host synchronisation), so all ranks agree on the step to stop at even when only one
rank was signalled. The loop then saves a checkpoint, writes summary.json with `"stopped"`,
and raises Preempted (exit code 75: requeue) or, for SIGINT, Interrupted (exit code 130).

Where the signals come from: Slurm's `--signal=USR1@90` (to every task), `scancel --signal`,
torchrun's agent (it forwards SIGTERM and SIGINT, and SIGUSR1 when TORCHELASTIC_SIGNALS_TO_HANDLE
lists it, to its workers and SIGKILLs them 30 s later: the save must fit in that window), or
Ctrl-C in the terminal (to the agent and every worker). Repeated signals change nothing: the
agent's SIGKILL, or SIGQUIT (Ctrl-\\), stops a run at once.
"""

from __future__ import annotations

import signal
import threading

# Flag values, reduced with MAX over the world: an interrupt outranks a preemption.
PREEMPT, INTERRUPT = 1, 2
STOP_SIGNALS = {signal.SIGTERM: PREEMPT, signal.SIGUSR1: PREEMPT, signal.SIGINT: INTERRUPT}


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the job should be requeued."""


class Interrupted(Preempted):
    """Training stopped on SIGINT (Ctrl-C) after saving a checkpoint."""


class StopSignals:
    """Installs the handlers (main thread only) and records the strongest signal received."""

    def __init__(self):
        self.received, self.flag, self._previous = None, 0, {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if STOP_SIGNALS[sig] >= self.flag:
            self.received, self.flag = sig.name, STOP_SIGNALS[sig]

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
