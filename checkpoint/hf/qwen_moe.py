"""Qwen2-MoE and Qwen3-MoE (model_types qwen2_moe, qwen3_moe): softmax top-k routers
(renormalised if norm_topk_prob), MoE blocks every decoder_sparse_step-th block except
mlp_only_layers (dense SwiGLU of intermediate_size there).

Qwen2-MoE: q/k/v biases, and a shared expert scaled per token by a sigmoid gate. Qwen3-MoE:
no biases, no shared expert, RMSNorm of each head of q and k (QK-norm "head") and a
head_dim independent of hidden_size / num_attention_heads.
"""

from __future__ import annotations

from checkpoint.hf.hf_config import (PLAIN_ROUTER, HFConfig, decoder_from_hf, decoder_to_hf,
                                     require, routing_from_hf)
from checkpoint.hf.table import Family
from model.config import ModelConfig, MoEConfig
from model.errors import ConfigError

# Ours under layers.{i}.ffn. -> HF under model.layers.{i}.mlp. (the experts: see PER_EXPERT)
QWEN2_MOE_BLOCK = {"router.weight": "gate.weight",
                   "shared.w1.weight": "shared_expert.gate_proj.weight",
                   "shared.w3.weight": "shared_expert.up_proj.weight",
                   "shared.w2.weight": "shared_expert.down_proj.weight",
                   "shared_gate.weight": "shared_expert_gate.weight"}
QWEN3_MOE_BLOCK = {"router.weight": "gate.weight"}
PER_EXPERT = ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight",
              "experts.{e}.down_proj.weight")


def _from_hf(c: HFConfig, **model_fields) -> tuple[ModelConfig, dict]:
    c.expect("use_sliding_window", (False,), False, "attention is full, not a sliding window")
    c.get("sliding_window", None), c.get("max_window_layers", None)  # in effect only with it
    layer_types = c.get("layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"{c.model_type} layer_types={layer_types!r} cannot be represented: "
                          "every block's attention is full_attention")
    model = decoder_from_hf(c, ffn_hidden=c.get("intermediate_size"), **model_fields)
    moe = dict(num_experts=c.get("num_experts", alias="num_local_experts"),
               expert_hidden=c.get("moe_intermediate_size"),
               renormalize=bool(c.get("norm_topk_prob", False)),
               every_n_layers=c.get("decoder_sparse_step", 1),
               dense_layers=list(c.get("mlp_only_layers", None) or []) or None,
               **routing_from_hf(c, 0.001))
    return model, moe


def qwen2_from_hf(config: dict) -> tuple[ModelConfig, MoEConfig]:
    c = HFConfig(config, "qwen2_moe")
    model, fields = _from_hf(c, qkv_bias=bool(c.get("qkv_bias", True)))
    shared = c.get("shared_expert_intermediate_size")
    if shared < 1:
        raise ConfigError(f"qwen2_moe shared_expert_intermediate_size={shared} cannot be "
                          "represented: its shared expert and gate are always built")
    moe = MoEConfig(**fields, shared_expert_hidden=shared, shared_expert_gate=True)
    c.finish()
    moe.validate()
    return model, moe


def qwen3_from_hf(config: dict) -> tuple[ModelConfig, MoEConfig]:
    c = HFConfig(config, "qwen3_moe")
    c.expect("attention_bias", (False,), False, "only q/k/v biases without an output bias (Qwen2) are")
    model, fields = _from_hf(c, qk_norm="head")
    moe = MoEConfig(**fields)
    c.finish()
    moe.validate()
    return model, moe


def _to_hf(model_type: str, architecture: str, model: ModelConfig, moe: MoEConfig) -> dict:
    if moe.every_n_layers < 1:
        raise ConfigError(f"{model_type} cannot express moe.every_n_layers ({moe.every_n_layers}): "
                          "its decoder_sparse_step is >= 1")
    return decoder_to_hf(model_type, architecture, model, moe) | {
        "intermediate_size": model.ffn_hidden, "moe_intermediate_size": moe.expert_hidden,
        "num_experts": moe.num_experts, "norm_topk_prob": moe.renormalizes,
        "decoder_sparse_step": moe.every_n_layers, "mlp_only_layers": list(moe.dense_layers or []),
        "use_sliding_window": False}


def qwen2_to_hf(model: ModelConfig, moe: MoEConfig) -> dict:
    require("qwen2_moe", model, moe, PLAIN_ROUTER | {"model.qk_norm": "none",
                                                     "moe.shared_expert_gate": True})
    return _to_hf("qwen2_moe", "Qwen2MoeForCausalLM", model, moe) | {
        "qkv_bias": model.qkv_bias, "shared_expert_intermediate_size": moe.shared_expert_hidden}


def qwen3_to_hf(model: ModelConfig, moe: MoEConfig) -> dict:
    require("qwen3_moe", model, moe, PLAIN_ROUTER | {
        "model.qk_norm": "head", "model.qkv_bias": False, "moe.shared_expert_hidden": 0})
    return _to_hf("qwen3_moe", "Qwen3MoeForCausalLM", model, moe) | {"attention_bias": False}


QWEN2_MOE = Family("qwen2_moe", "Qwen2MoeForCausalLM", QWEN2_MOE_BLOCK, PER_EXPERT,
                   qwen2_from_hf, qwen2_to_hf)
QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_MOE_BLOCK, PER_EXPERT,
                   qwen3_from_hf, qwen3_to_hf)
