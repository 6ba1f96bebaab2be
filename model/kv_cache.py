"""Keys and values of every block, kept for incremental decoding (one process).

Shape legend: B batch, G key/value heads, P positions (the cache's capacity), S new tokens,
Dh head dim.

Each block's attention writes the keys and values of its S new tokens at positions
[start, start + S) and attends to positions [0, start + S). Positions are explicit, so a
caller may rewind (decode again from an earlier position) by passing a smaller start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LayerCache:
    """One block's keys and values, (B, G, P, Dh) each, allocated once."""

    def __init__(self, k_BGPDh: torch.Tensor, v_BGPDh: torch.Tensor):
        self.k_BGPDh, self.v_BGPDh = k_BGPDh, v_BGPDh

    def update(self, k_BGSDh: torch.Tensor, v_BGSDh: torch.Tensor, start: int):
        """Store the new keys and values at [start, start + S); return those of [0, start + S)."""
        end = start + k_BGSDh.shape[2]
        if end > self.k_BGPDh.shape[2]:
            raise ValueError(f"positions [{start}, {end}) exceed the cache's "
                             f"{self.k_BGPDh.shape[2]}")
        self.k_BGPDh[:, :, start:end] = k_BGSDh
        self.v_BGPDh[:, :, start:end] = v_BGSDh
        return self.k_BGPDh[:, :, :end], self.v_BGPDh[:, :, :end]


class KVCache:
    """A LayerCache per block of `model` for `batch` sequences of up to `max_len` positions,
    in the dtype and on the device of the model's attention weights."""

    def __init__(self, model: nn.Module, batch: int, max_len: int):
        self.max_len = max_len
        self.layers = []
        for block in model.layers:
            attn = block.attention
            w = attn.wk.weight
            shape = (batch, attn.n_kv_heads, max_len, attn.head_dim)
            self.layers.append(LayerCache(w.new_zeros(shape), w.new_zeros(shape)))

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]


@torch.no_grad()
def generate(model: nn.Module, prompt_BS: torch.Tensor, max_new_tokens: int,
             pick: Callable[[torch.Tensor], torch.Tensor] | None = None,
             stop_id: int | None = None) -> torch.Tensor:
    """prompt_BS followed by up to max_new_tokens tokens, each `pick(last logits)` (B, 1)
    (default: the argmax): one forward over the prompt fills the cache, then one forward per
    new token. Stops early once every sequence has produced `stop_id`."""
    B, S = prompt_BS.shape
    cache = KVCache(model, B, S + max_new_tokens)
    pick = pick or (lambda logits_BV: logits_BV.argmax(-1, keepdim=True))
    tokens_BS, start, new_BS = prompt_BS, 0, prompt_BS
    done_B = torch.zeros(B, dtype=torch.bool, device=prompt_BS.device)
    for _ in range(max_new_tokens):
        logits = model(new_BS, cache=cache, start=start).logits
        start += new_BS.shape[1]
        new_BS = pick(logits[:, -1]).to(prompt_BS.dtype)
        tokens_BS = torch.cat([tokens_BS, new_BS], dim=1)
        if stop_id is not None:
            done_B |= new_BS[:, 0] == stop_id
            if bool(done_B.all()):  # a host sync per token, only with a stop_id
                break
    return tokens_BS


def greedy_generate(model: nn.Module, prompt_BS: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """prompt_BS followed by max_new_tokens tokens, each the argmax of the model's logits."""
    return generate(model, prompt_BS, max_new_tokens)
