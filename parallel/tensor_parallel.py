"""Tensor parallelism as a transform: shard the dense weights, inject the region collectives.

Attention splits its query and key/value heads (wq, wk, wv and their biases column-parallel,
wo row-parallel; a QK-norm over the whole projection splits its gain with the heads, a
per-head one is kept whole); the dense SwiGLU, and an MoE layer's shared expert, split their
hidden units (w1, w3 column-parallel, w2 row-parallel). The embedding, the output
projection, the norms and the router stay replicated: with the byte vocabulary (256) a
vocabulary-parallel embedding and cross-entropy would save nothing and add two collectives;
they pay off at 32k+ vocabularies. MoE experts are not split by tp: each tp rank dispatches
its slice of the tokens (model/moe/native_backend.py), and tp partners holding the same experts
reduce their gradients in the expert-data-parallel group.

Every sharded parameter gets `tp_partition_dim` (the dim it was cut along) and
`tensor_model_parallel = True` (the attribute DeepSpeed and Megatron read); checkpoints and
the gradient norm use them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.errors import ConfigError
from model.moe import MoELayer
from parallel.collectives import all_gather_cat, all_reduce
from parallel.topology import Topology


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    all_reduce(x, group)
    return x


def _my_slice(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = x.shape[0] // size
    return x[rank * n : (rank + 1) * n].contiguous()


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.comm.group), None


class _Exit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return _all_reduce(x, comm.group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _my_slice(x, comm.rank, comm.size)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_cat(grad, ctx.comm.group, ctx.comm.size), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return all_gather_cat(x, comm.group, comm.size)

    @staticmethod
    def backward(ctx, grad):
        # Downstream of the gather is replicated: every rank holds the same full gradient.
        return _my_slice(grad, ctx.comm.rank, ctx.comm.size), None


class _AllReduce(torch.autograd.Function):
    """A sum over the group whose every term is also used rank-locally: each rank's backward
    holds only its own part of the gradient of the sum, so the parts are summed as well."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _all_reduce(x, comm.group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.comm.group), None


class ProcessGroupTP:
    """model.tp.TensorParallelComm over a torch.distributed tensor-parallel group."""

    def __init__(self, group: dist.ProcessGroup, compiled: bool = False):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if compiled:
            # Under train.compile the attention around enter/exit is compiled: the collectives
            # stay out of the graph (a clean graph break, instead of dynamo tracing into the
            # process-group calls). Applied here, not as a decorator, because the decorator
            # imports torch._dynamo: 3 s of start-up in every process that never compiles.
            self.enter = torch.compiler.disable(self.enter)
            self.exit = torch.compiler.disable(self.exit)
            self.all_reduce = torch.compiler.disable(self.all_reduce)

    def enter(self, x):
        return _Enter.apply(x, self)

    def exit(self, x):
        return _Exit.apply(x, self)

    def split(self, x):
        if x.shape[0] % self.size:
            raise ValueError(f"tokens ({x.shape[0]}) must be divisible by tp ({self.size})")
        return _Split.apply(x, self)

    def gather(self, x):
        return _Gather.apply(x, self)

    def all_reduce(self, x):
        return _AllReduce.apply(x, self)


def _shard_(module: nn.Module, dim: int, rank: int, size: int) -> None:
    """Keep this rank's slice of module.weight along `dim`, and of its bias if it has one
    (a bias follows the output rows: only column-parallel modules, dim 0, may have one)."""
    for name in ("weight", "bias"):
        full = getattr(module, name, None)
        if full is None:
            continue
        d = dim if name == "weight" else 0
        if full.shape[d] % size:
            raise ConfigError(f"{tuple(full.shape)} {name} cannot be split {size} ways along dim {d}")
        piece = full.shape[d] // size
        shard = nn.Parameter(full.detach().narrow(d, rank * piece, piece).clone())
        shard.tp_partition_dim = d
        shard.tensor_model_parallel = True
        setattr(module, name, shard)


def apply_tensor_parallel(model: nn.Module, topology: Topology, compiled: bool = False) -> None:
    """Keep this tp rank's shard of every attention and dense MLP; inject the tp comm.

    Call on the plainly built (same seed on every rank) model, before the optimizer exists;
    `compiled`: the model will be compiled (train.compile), so the comm stays out of its graphs.
    """
    tp = topology.size("tp")
    if tp == 1:
        return
    cfg = model.cfg
    if cfg.n_heads % tp or cfg.kv_heads % tp:
        raise ConfigError(
            f"model.n_heads ({cfg.n_heads}) and the key/value heads, model.n_kv_heads "
            f"({cfg.kv_heads}), must both be divisible by parallel.tp ({tp})")
    comm, rank = ProcessGroupTP(topology.groups["tp"], compiled), topology.coord("tp")
    for block in model.layers:
        attn = block.attention
        for linear in (attn.wq, attn.wk, attn.wv):
            _shard_(linear, 0, rank, tp)  # nn.Linear weight is (out, in): rows = output units
        _shard_(attn.wo, 1, rank, tp)
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
        attn.tp = comm
        if attn.qk_norm != "none":
            for norm in (attn.q_norm, attn.k_norm):
                if norm.over == "proj":  # the gain follows the heads; "head": one gain, whole
                    _shard_(norm, 0, rank, tp)
                norm.tp = comm
        if isinstance(block.ffn, MoELayer):  # replicated router and experts, token slices
            block.ffn.tp = comm
            if block.ffn.shared is not None:
                _shard_swiglu(block.ffn.shared, comm, rank, tp)
        else:
            _shard_swiglu(block.ffn, comm, rank, tp)


def _shard_swiglu(ffn: nn.Module, comm: ProcessGroupTP, rank: int, tp: int) -> None:
    """A dense SwiGLU (a block's FFN or an MoE layer's shared expert): w1, w3 column-parallel,
    w2 row-parallel, the tp comm's all-reduce at its exit."""
    for linear in (ffn.w1, ffn.w3):
        _shard_(linear, 0, rank, tp)  # nn.Linear weight is (out, in): rows = output units
    _shard_(ffn.w2, 1, rank, tp)
    ffn.tp = comm
