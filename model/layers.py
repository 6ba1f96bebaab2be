"""Dense building blocks of the transformer: RMSNorm, rotary attention, SwiGLU MLP.

Shape legend: B batch, S sequence (new tokens), D model dim, H query heads, G key/value heads,
Dh head dim, F ffn hidden, P positions attended (the cache's and the new ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.tp import LocalTP, TensorParallelComm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight."""
    if x.dtype == weight.dtype:
        # torch's own (its fused _fused_rms_norm kernel, accumulating in fp32 for bf16
        # input) instead of five elementwise passes each way; on CPU the same numbers as
        # the lines below.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Normalise in fp32: the mean of squares underflows in bf16.
    x_f = x.float()
    x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + eps)
    return x_f.type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class QKNorm(nn.Module):
    """RMSNorm of the queries or the keys inside the tensor-parallel region (model.qk_norm).

    head: over each head's features, x (B, S, H, Dh); one gain of Dh for every head, kept
    whole on every tp rank, which holds other heads: `tp.enter` sums its gradient over them.
    proj: over the whole projection, x (B, S, H * Dh); the gain is split with the heads and
    the mean of squares divides the tp group's sum (`tp.all_reduce`) by the global size.
    """

    def __init__(self, size: int, eps: float, over: str):
        super().__init__()
        self.over, self.eps = over, eps
        self.size = size  # global features of the normalised vector
        self.weight = nn.Parameter(torch.ones(size))
        self.tp: TensorParallelComm = LocalTP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.over == "head":
            return rms_norm(x, self.tp.enter(self.weight), self.eps)
        x_f = x.float()
        mean_square = self.tp.all_reduce(x_f.pow(2).sum(-1, keepdim=True)) / self.size
        return (x_f * torch.rsqrt(mean_square + self.eps)).type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim / 2), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles_SH = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles_SH.cos(), angles_SH.sin()


def apply_rotary(x_BHSDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) by the position's angle (GPT-NeoX/LLaMA form),
    in fp32: (x0 + i x1) * (cos + i sin), one complex multiply.

    The same arithmetic as x0 cos - x1 sin, x0 sin + x1 cos written out, but three kernels
    (upcast, multiply, downcast) and their three backward, where the written-out form runs
    about nine each way over fp32 copies of q and k (train.compile fuses either).
    The tables stay fp32 even when a bf16 model holds them in bf16 (DeepSpeed casts buffers).
    """
    x_c = torch.view_as_complex(x_BHSDh.float().unflatten(-1, (-1, 2)))
    rotation = torch.complex(cos.float(), sin.float())
    return torch.view_as_real(x_c * rotation).flatten(-2).type_as(x_BHSDh)


class Attention(nn.Module):
    """Causal self-attention with rotary positions, grouped key/value heads (GQA), optional
    q/k/v bias and QK-norm.

    Tensor parallelism splits the heads, query and key/value alike: wq, wk, wv (and their
    biases) are column-parallel (each rank keeps the rows of its heads), wo is row-parallel
    (the matching input columns); `tp.exit` sums the partial outputs. Query head h reads
    key/value head h // (H / G), so a rank's query heads read exactly its key/value heads.
    Separate q/k/v matrices keep every shard one contiguous slice.

    With a `cache` (incremental decoding, model.kv_cache), the S new tokens sit at positions
    [start, start + S): their keys and values are written there and the queries attend to
    every position before theirs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Heads on this rank: n_heads / tp and n_kv_heads / tp after parallelisation.
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        q_size, kv_size = cfg.n_heads * self.head_dim, cfg.kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.dim, q_size, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, kv_size, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, kv_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_size, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = QKNorm(self.head_dim if per_head else q_size, cfg.norm_eps, cfg.qk_norm)
            self.k_norm = QKNorm(self.head_dim if per_head else kv_size, cfg.norm_eps, cfg.qk_norm)
        self.tp: TensorParallelComm = LocalTP()

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache=None, start: int = 0) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        x_BSD = self.tp.enter(x_BSD)
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHDh = q.view(B, S, self.n_heads, self.head_dim)
        k_BSGDh = k.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BSHDh, k_BSGDh = self.q_norm(q_BSHDh), self.k_norm(k_BSGDh)
        cos, sin = cos[start : start + S], sin[start : start + S]
        q_BHSDh = apply_rotary(q_BSHDh.transpose(1, 2), cos, sin)
        k_BGPDh = apply_rotary(k_BSGDh.transpose(1, 2), cos, sin)
        v_BGPDh = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        mask_SP, causal = None, S > 1
        if cache is not None:
            k_BGPDh, v_BGPDh = cache.update(k_BGPDh, v_BGPDh, start)
            if start:  # causal, shifted: new token i sees positions <= start + i
                P, causal = start + S, False
                mask_SP = (torch.arange(P, device=q.device)
                           <= torch.arange(start, P, device=q.device)[:, None]) if S > 1 else None
        out_BHSDh = F.scaled_dot_product_attention(
            q_BHSDh, k_BGPDh, v_BGPDh, attn_mask=mask_SP, is_causal=causal,
            enable_gqa=self.n_kv_heads != self.n_heads)
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
