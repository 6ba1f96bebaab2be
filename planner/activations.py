"""Activations kept for backward: every tensor autograd saves in one training forward, per block.

An inventory, not a rule of thumb: each entry is one storage that an operation of model/ saves
(ctx.save_for_backward, or autograd's own formula for a torch op), counted once however many
operations save it, parameters and buffers left out. This is what
benchmarks/saved_tensors.saved_tensor_bytes measures, and the tests hold the two together.

Shape letters: T tokens of the micro-batch on this rank, t = T / tp (the tokens this rank's MoE
layers dispatch), D model dim, Hl/Gl query/key-value heads on this rank, Dh head size, F dense
hidden / tp, Fs shared-expert hidden / tp, Fe expert hidden, E experts, El = E / ep, K top_k,
R rows this rank's experts receive (the busiest rank's, planner/shapes.py), V vocabulary.

What the kernels keep differs by device, and only the CPU's is measured here:
- RMSNorm: on CPU torch's composite keeps its input, 1/rms (fp32) and the normalised input;
  on CUDA the fused kernel keeps the input and 1/rms only (_fused_rms_norm's formula).
- Attention: CPU's and CUDA's fused SDPA kernels keep q, k, v, the output and the log-sum-exp
  (fp32, B x Hl x S); none keeps the S x S scores.
- bf16 autocast (stage 0 on GPU) casts a linear's fp32 input to a bf16 copy on every call
  (wq, wk and wv each make one) and each weight once per forward (autocast's cache); autograd
  keeps both until backward. Measured on CPU, where autocast casts the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.moe_activations import moe_layer
from planner.saved import Saved, linear_inputs, rms_norm, sum_bytes, swiglu
from planner.shapes import FP32, INT64, Shapes


def attention(s: Shapes) -> list[Saved]:
    m, p = s.job.model, s.precision
    T, D, (Hl, Gl, Dh) = s.tokens, m.dim, s.heads()
    B, S = s.job.train.micro_batch_size, s.job.train.seq_len
    q, kv = Hl * Dh, Gl * Dh
    kept = rms_norm(s, T, D, p.residual, "attention norm")
    kept += linear_inputs(s, T, D, [D * q, D * kv, D * kv], "wq/wk/wv", p.residual)
    qk_bytes = p.compute  # q and k as SDPA reads them
    for name, width, heads in (("q", q, Hl), ("k", kv, Gl)):
        # Under autocast the norm's output is fp32 (an fp32 gain times bf16) and SDPA keeps
        # the bf16 copy autocast makes of it: still qk_bytes.
        kept += _qk_norm(s, name, width, heads)
    kept += [Saved("rotary: cos + i sin table, q", S * Dh // 2 * 8),
             Saved("rotary: cos + i sin table, k", S * Dh // 2 * 8),
             Saved("SDPA: q", T * q * qk_bytes), Saved("SDPA: k", T * kv * qk_bytes),
             Saved("SDPA: v", T * kv * p.compute), Saved("SDPA: output (wo's input)", T * q * p.compute),
             Saved("SDPA: log-sum-exp (fp32)", B * Hl * S * FP32)]
    if p.autocast:
        kept.append(Saved("wo: bf16 weight copy", q * D * 2))
    return kept


def _qk_norm(s: Shapes, name: str, width: int, heads: int) -> list[Saved]:
    """model.layers.QKNorm over the wq or wk output (T x width, in the compute dtype)."""
    mode, p, T = s.job.model.qk_norm, s.precision, s.tokens
    what = f"{name} norm ({mode})"
    if mode == "none":
        return []
    if mode == "head" and not p.autocast:  # F.rms_norm over each head's Dh features
        return rms_norm(s, T * heads, width // heads, p.compute, what)
    rows = T * heads if mode == "head" else T
    # The written-out norm: x.float() (kept), 1/rms (fp32), x / rms in x's dtype (kept by the
    # product with the gain); with tp, "proj" sums the squares over the tp group first.
    return [Saved(f"{what}: fp32 input", T * width * FP32), Saved(f"{what}: 1/rms", rows * FP32),
            Saved(f"{what}: normalised input", T * width * p.compute)]


def dense_ffn(s: Shapes) -> list[Saved]:
    m = s.job.model
    return (rms_norm(s, s.tokens, m.dim, s.precision.residual, "ffn norm")
            + swiglu(s, m.ffn_hidden // s.layout.tp, "dense FFN", None))


def moe_ffn(s: Shapes) -> list[Saved]:
    """The native MoE layer: router, dispatch, experts, combine, shared expert."""
    return rms_norm(s, s.tokens, s.job.model.dim, s.precision.residual, "ffn norm") + moe_layer(s)


def model_ends(s: Shapes) -> list[Saved]:
    """The embedding's token ids, the final norm, the output projection and the loss."""
    m, p, T = s.job.model, s.precision, s.tokens
    return ([Saved("embedding: token ids", T * INT64)]
            + rms_norm(s, T, m.dim, p.residual, "final norm")
            + linear_inputs(s, T, m.dim, [m.dim * m.vocab_size], "output projection", p.residual)
            + [Saved("cross-entropy: log-softmax (fp32)", T * m.vocab_size * FP32),
               Saved("cross-entropy: targets", T * INT64), Saved("cross-entropy: weight sum", FP32)]
            + _pooled_aux(s))


def _pooled_aux(s: Shapes) -> list[Saved]:
    if s.moe_blocks and s.moe.aux_loss_form == "pooled":
        return [Saved("pooled load-balancing loss: f_e", s.moe.num_experts * FP32)]
    return []


@dataclass(frozen=True)
class Activations:
    """Bytes kept for backward by one micro-batch's forward, and what recompute adds back."""

    dense_block: float
    moe_block: float
    ends: float
    recompute_transient: float
    """One recomputed region's activations, alive while backward recomputes it (0 without)."""
    items: dict[str, list[Saved]]

    def total(self, s: Shapes) -> float:
        return s.dense_blocks * self.dense_block + s.moe_blocks * self.moe_block + self.ends


def activations(s: Shapes) -> Activations:
    """train.recompute: none keeps everything; ffn keeps the attention's and the feed-forward's
    input (torch.utils.checkpoint keeps its inputs); full keeps each block's input."""
    mode, T, D = s.job.train.recompute, s.tokens, s.job.model.dim
    attn, dense, moe = attention(s), dense_ffn(s), moe_ffn(s)
    block_in = [Saved("checkpointed block's input", T * D * s.precision.residual)]
    if mode == "none":
        kept = {"dense": attn + dense, "moe": attn + moe}
        transient = 0.0
    elif mode == "ffn":
        kept = {"dense": attn + block_in, "moe": attn + block_in}
        transient = max(sum_bytes(dense), sum_bytes(moe) if s.moe_blocks else 0.0)
    else:
        kept = {"dense": block_in, "moe": block_in}
        transient = max(sum_bytes(attn + dense), sum_bytes(attn + moe) if s.moe_blocks else 0.0)
    ends = model_ends(s)
    return Activations(sum_bytes(kept["dense"]), sum_bytes(kept["moe"]), sum_bytes(ends), transient,
                       {"dense block": kept["dense"], "MoE block": kept["moe"], "ends": ends})
