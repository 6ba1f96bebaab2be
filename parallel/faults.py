"""Fault points: named places in a run where a test can make a failure happen.

Production code calls `fault_point(name, **where)` at a few places (a rank has written its
checkpoint shard; a training step is done). It does nothing unless a hook was installed with
`install`, which only tests do (tests/faults.py runs the real entry point with one), so no
environment variable or flag in the trainer can make a run fail on purpose.

    checkpoint.shard_written   rank, step   after a rank wrote its shard, before the commit
    train.step_done            rank, step   after a step (and its eval and checkpoint)
    train.grads_ready          rank, step, model   after backward, before the reduction
"""

from __future__ import annotations

from collections.abc import Callable

_hook: Callable[..., None] | None = None


def install(hook: Callable[..., None] | None) -> None:
    """Call `hook(name, **where)` at every fault point of this process (None removes it)."""
    global _hook
    _hook = hook


def fault_point(name: str, **where) -> None:
    if _hook is not None:
        _hook(name, **where)
