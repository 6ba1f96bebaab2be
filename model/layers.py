"""Dense building blocks of the transformer: RMSNorm, rotary attention, SwiGLU MLP.

Shape legend: B batch, S sequence, D model dim, H heads, Dh head dim, F ffn hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.tp import LocalTP, TensorParallelComm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            # torch's own (its fused _fused_rms_norm kernel, accumulating in fp32 for bf16
            # input) instead of five elementwise passes each way; on CPU the same numbers as
            # the lines below.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32: the mean of squares underflows in bf16.
        x_f = x.float()
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_f.type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim / 2), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles_SH = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles_SH.cos(), angles_SH.sin()


def apply_rotary(x_BHSDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) by the position's angle (GPT-NeoX/LLaMA form),
    in fp32: (x0 + i x1) * (cos + i sin), one complex multiply.

    The same arithmetic as x0 cos - x1 sin, x0 sin + x1 cos written out, but three kernels
    (upcast, multiply, downcast) and their three backward, where the written-out form ran
    about nine each way over fp32 copies of q and k: by bytes moved, some 35 ms of a
    250 ms configs/gpu_moe_1b.yaml step in eager mode on an H100 (train.compile fuses either).
    The tables stay fp32 even when a bf16 model holds them in bf16 (DeepSpeed casts buffers).
    """
    x_c = torch.view_as_complex(x_BHSDh.float().unflatten(-1, (-1, 2)))
    rotation = torch.complex(cos.float(), sin.float())
    return torch.view_as_real(x_c * rotation).flatten(-2).type_as(x_BHSDh)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions.

    Tensor parallelism splits the heads: wq, wk, wv are column-parallel (each rank keeps the
    rows of its heads), wo is row-parallel (the matching input columns); `tp.exit` sums the
    partial outputs. Separate q/k/v matrices keep every shard one contiguous slice.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads  # heads on this rank: n_heads / tp after parallelisation
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.tp: TensorParallelComm = LocalTP()

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        x_BSD = self.tp.enter(x_BSD)
        q_BHSDh, k_BHSDh, v_BHSDh = (
            w(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
            for w in (self.wq, self.wk, self.wv)
        )
        q_BHSDh = apply_rotary(q_BHSDh, cos[:S], sin[:S])
        k_BHSDh = apply_rotary(k_BHSDh, cos[:S], sin[:S])
        out_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, is_causal=True)
        return self.tp.exit(self.wo(out_BHSDh.transpose(1, 2).reshape(B, S, -1)))


class SwiGLU(nn.Module):
    """Dense feed-forward: w2(silu(w1 x) * w3 x). Also the reference for one MoE expert.

    Tensor parallelism: w1 and w3 column-parallel, w2 row-parallel, one all-reduce at exit.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.tp: TensorParallelComm = LocalTP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tp.enter(x)
        return self.tp.exit(self.w2(F.silu(self.w1(x)) * self.w3(x)))
