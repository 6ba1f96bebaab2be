"""Proof that train.recompute ran: each block's feed-forward is called twice per step (forward,
then again inside backward) when recomputed, once when not. The equivalence tests compare
numbers, which recomputing must not change; this shows the recompute happened at all."""

from __future__ import annotations

from torch import nn


class FeedForwardCalls:
    """Counts the calls of every block's feed-forward (the MoE layer or the dense FFN)."""

    def __init__(self, model: nn.Module):
        self.calls = [0] * len(model.layers)
        # Pre-hooks: they count a call even if it does not return (torch's early stop, which
        # model.transformer turns off, would end a recompute inside the feed-forward).
        self._handles = [block.ffn.register_forward_pre_hook(self._hook(i))
                         for i, block in enumerate(model.layers)]

    def _hook(self, i: int):
        def count(module, args) -> None:
            self.calls[i] += 1
        return count

    def expect(self, mode: str, steps: int = 1) -> None:
        """After `steps` forward + backward passes: twice each per step when `mode` recomputes
        the feed-forward (ffn, full), once when not (none)."""
        want = steps * (1 if mode == "none" else 2)
        if self.calls != [want] * len(self.calls):
            raise AssertionError(f"feed-forward calls per block {self.calls}, expected {want} each "
                                 f"for train.recompute={mode} over {steps} step(s)")
