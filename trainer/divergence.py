"""The per-step check: did any rank see a non-finite loss or gradient norm, or a stop signal?

One all-reduce (MAX) of three small integers over the world, read once on the host: the
step's one host synchronisation, which the step needs anyway to know whether to apply the
update. It runs after the gradients are reduced and clipped and BEFORE the optimizer update
(DeepSpeed's ZeRO step, which runs inside its backward, skips a non-finite step itself), so a
diverged step changes no parameter, no optimizer state and no expert bias.

A non-finite gradient norm is the same on every rank (it is global); a non-finite loss may be
one rank's alone. Either stops the run with exit code 6 (Diverged), naming the step, the
quantity and the ranks, unless train.max_nonfinite_steps allows skipping it: the step's
update is then not applied, its batch is passed over and the step counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.collectives import all_gather_object, all_reduce


class Diverged(Exception):
    """A non-finite loss or gradient norm, more often than train.max_nonfinite_steps allows."""


@dataclass(frozen=True)
class StepCheck:
    stop: int  # trainer.signals' flag, the strongest over the world (0: none)
    loss_finite: bool  # on every rank
    norm_finite: bool

    @property
    def finite(self) -> bool:
        return self.loss_finite and self.norm_finite


def check_step(loss: torch.Tensor, norm: torch.Tensor, stop_flag: int) -> StepCheck:
    """Collective over the world. `loss` is this rank's summed loss of the step (a 0-d tensor
    on the device), `norm` the global gradient norm before clipping."""
    flags = torch.stack([torch.tensor(stop_flag, device=loss.device),
                         (~torch.isfinite(loss.detach())).to(torch.int64),
                         (~torch.isfinite(norm.to(loss.device))).to(torch.int64)])
    all_reduce(flags, None, dist.ReduceOp.MAX)
    stop, loss_bad, norm_bad = flags.tolist()  # host synchronisation: the step's one
    return StepCheck(stop, not loss_bad, not norm_bad)


def describe(check: StepCheck, step: int, loss: torch.Tensor, norm: torch.Tensor) -> str:
    """What went wrong at `step` and on which ranks. Collective (all ranks call it together
    once the check failed)."""
    values = all_gather_object((float(loss), float(norm)))
    bad_loss = [r for r, (v, _) in enumerate(values) if not math.isfinite(v)]
    parts = []
    if bad_loss:
        parts.append(f"the loss is {values[bad_loss[0]][0]} on rank(s) {bad_loss}")
    if not check.norm_finite:
        parts.append(f"the gradient norm is {values[0][1]}")
    return f"step {step}: " + " and ".join(parts)
