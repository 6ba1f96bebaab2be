"""How much arithmetic one training token costs: the numerator of MFU.

Model FLOPs (not hardware FLOPs): what the model needs, whatever the implementation does.
Recomputation, padding, dropped-then-recomputed tokens and capacity buffers are not counted,
so a faster implementation of the same model gets a higher MFU and never a padded one.

Per token, forward = 2 x (activated matmul parameters) + causal attention; training =
3 x forward (backward costs twice the forward). Activated matmul parameters per layer:
attention wq, wo (D x H Dh each) and wk, wv (D x G Dh each: G key/value heads), which is
4 D^2 for multi-head attention with Dh = D / H; an MoE layer's router (D x E), top_k SwiGLU
experts (3 D F_e each), its shared expert if any (3 D F_s) and that expert's gate (D); a
dense layer's SwiGLU (3 D F); plus the output projection (D x V). The embedding lookup, the
q/k/v biases and the norms are not matmuls and are not counted there (total_params has them).
Causal attention: QK^T and AV cost 2 x 2 x H Dh x c per token and layer, where c is the number
of keys the token attends to, on average (S + 1) / 2 for a causal sequence of S tokens; the
often-quoted 12 L D S (PaLM) counts the masked half too and overstates MFU for causal models.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig, MoEConfig


@dataclass(frozen=True)
class ModelCost:
    total_params: int
    """Every parameter, all experts included (embedding included; counted once if tied)."""
    activated_params: int
    """Matmul parameters one token passes through (top_k experts per MoE layer)."""
    flops_per_token: float
    """Training FLOPs per token: 3 x (2 x activated_params + causal attention)."""


def model_cost(model: ModelConfig, moe: MoEConfig, seq_len: int) -> ModelCost:
    D, L, V = model.dim, model.n_layers, model.vocab_size
    n_moe = sum(moe.is_moe_layer(i) for i in range(L))
    n_dense = L - n_moe
    q_size, kv_size = model.n_heads * model.head_size, model.kv_heads * model.head_size
    attention = 2 * D * q_size + 2 * D * kv_size
    qk_norm = {"none": 0, "head": 2 * model.head_size, "proj": q_size + kv_size}[model.qk_norm]
    attention_vectors = (q_size + 2 * kv_size) * model.qkv_bias + qk_norm  # biases, QK-norm gains
    expert = 3 * D * moe.expert_hidden
    shared = 3 * D * moe.shared_expert_hidden + D * moe.shared_expert_gate
    moe_dense = D * moe.num_experts + shared  # router, shared expert and its gate
    dense_ffn = 3 * D * model.ffn_hidden
    head = D * V
    norms = (2 * L + 1) * D
    embedding = 0 if model.tie_embeddings else V * D
    total = (L * (attention + attention_vectors) + n_moe * (moe_dense + moe.num_experts * expert)
             + n_dense * dense_ffn + head + norms + embedding)
    activated = L * attention + n_moe * (moe_dense + moe.top_k * expert) + n_dense * dense_ffn + head
    attention_scores = L * 4 * q_size * (seq_len + 1) / 2
    return ModelCost(total, activated, 3 * (2 * activated + attention_scores))


# Dense bf16 peak of one device, in FLOP/s (vendor figures without sparsity). MFU on any other
# device needs logging.peak_tflops.
# The first name that the device name contains wins: H100 PCIe and NVL before the SXM part.
_PEAK_BF16 = (("H200", 989e12), ("H100 PCIE", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
              ("A100", 312e12))


def known_peak_flops(device_name: str) -> float | None:
    """The table's dense bf16 peak for a CUDA device name, or None."""
    return next((peak for key, peak in _PEAK_BF16 if key in device_name.upper()), None)
