"""Choosing the next token from the model's logits: greedy, or sampled with a temperature,
top-k and top-p (nucleus), in transformers' conventions, so its `generate` is the reference.

Shape legend: B batch, V vocabulary.

    temperature  logits / temperature; 0 = greedy (argmax)
    top_k        keep the k largest logits (and any tied with the k-th); 0 = all
    top_p        keep the smallest set of the largest probabilities whose sum exceeds
                 top_p (at least one token); 1 = all
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def filter_logits(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Scaled logits with the filtered-out tokens at -inf (applied in that order)."""
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0 to sample (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1]")
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1:
        # Ascending: a token goes when the probability of it and every smaller one is at most
        # 1 - top_p; the largest always stays.
        sorted_BV, order_BV = torch.sort(logits_BV)
        drop_BV = sorted_BV.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_BV[:, -1] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(1, order_BV, drop_BV), float("-inf"))
    return logits_BV


def sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits_BV -> next tokens (B, 1): argmax at temperature 0, else a draw from the
    filtered distribution (`generator` seeds it)."""
    if temperature == 0:
        return lambda logits_BV: logits_BV.argmax(-1, keepdim=True)

    def pick(logits_BV: torch.Tensor) -> torch.Tensor:
        probs_BV = filter_logits(logits_BV, temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs_BV, 1, generator=generator)

    return pick
