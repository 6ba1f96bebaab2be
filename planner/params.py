"""This rank's parameters, tensor by tensor, from the model built on the meta device.

One block of each kind (dense, MoE) is built on `meta` (shapes without storage), and the
embedding, final norm and output; each parameter is then cut as the transforms cut it:
parallel/tensor_parallel.py splits attention's wq/wk/wv (and their biases) by rows and wo by
columns, a proj QK-norm's gains with the heads, every dense SwiGLU (a block's FFN, an MoE
layer's shared expert) w1/w3 by rows and w2 by columns; parallel/expert_parallel.py keeps
num_experts / ep rows of the stacked experts. The rest (norms, router, embedding, output,
a head QK-norm, the shared expert's gate) is whole on every rank.

The order is model.parameters()'s: DeepSpeed flattens its groups in this order and cuts its
expert groups by it (planner/zero_groups.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from model.layers import RMSNorm, SwiGLU
from model.moe import build_moe
from model.transformer import Block
from planner.shapes import Shapes

# Names (inside a block) of the tensors tp splits, and the dim it splits them along.
_TP_SPLIT = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
             "attention.wq.bias": 0, "attention.wk.bias": 0, "attention.wv.bias": 0,
             "attention.wo.weight": 1, "ffn.w1.weight": 0, "ffn.w3.weight": 0, "ffn.w2.weight": 1,
             "ffn.shared.w1.weight": 0, "ffn.shared.w3.weight": 0, "ffn.shared.w2.weight": 1}
_TP_SPLIT_PROJ = {"attention.q_norm.weight": 0, "attention.k_norm.weight": 0}


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    """This rank's shape."""
    expert: bool
    """On the expert axis: reduced and sharded over edp, not dp."""

    @functools.cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decays(self) -> bool:
        """trainer.optim.param_groups: matrices decay, 1-D gains do not."""
        return len(self.shape) >= 2


def _local_shape(name: str, shape: tuple[int, ...], s: Shapes) -> tuple[tuple[int, ...], bool]:
    tp, ep = s.layout.tp, s.layout.ep
    inner = name.split(".", 2)[2] if name.startswith("layers.") else name
    if ".experts." in name:
        return (shape[0] // ep, *shape[1:]), True
    split = _TP_SPLIT.get(inner)
    if split is None and s.job.model.qk_norm == "proj":
        split = _TP_SPLIT_PROJ.get(inner)
    if split is None:
        return shape, False
    cut = list(shape)
    cut[split] //= tp
    return tuple(cut), False


def _named_shapes(s: Shapes) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of the model at its global shape, in model.parameters() order."""
    m, moe = s.job.model, s.job.moe
    with torch.device("meta"):
        kinds = {False: Block(m, SwiGLU(m.dim, m.ffn_hidden))}
        if s.moe_blocks:
            kinds[True] = Block(m, build_moe(m.dim, moe))
        ends = {"tok_embeddings.weight": (m.vocab_size, m.dim),
                "norm.weight": tuple(RMSNorm(m.dim, m.norm_eps).weight.shape)}
    out = [("tok_embeddings.weight", ends["tok_embeddings.weight"])]
    for i in range(m.n_layers):
        block = kinds[moe.is_moe_layer(i)]
        out += [(f"layers.{i}.{n}", tuple(p.shape)) for n, p in block.named_parameters()]
    out.append(("norm.weight", ends["norm.weight"]))
    if not m.tie_embeddings:  # tied, the output is the embedding: one parameter
        out.append(("output.weight", (m.vocab_size, m.dim)))
    return out


_CACHE: dict[tuple, list[Param]] = {}  # a search plans one model at many layouts


def parameters(s: Shapes) -> list[Param]:
    """This rank's parameters in model.parameters() order, at their local shapes."""
    key = (repr(s.job.model), repr(s.job.moe), s.layout.tp, s.layout.ep)
    if key not in _CACHE:
        _CACHE[key] = [Param(name, *_local_shape(name, shape, s)) for name, shape in _named_shapes(s)]
    return _CACHE[key]


def count(params: list[Param], expert: bool | None = None) -> int:
    return sum(p.numel for p in params if expert is None or p.expert == expert)
