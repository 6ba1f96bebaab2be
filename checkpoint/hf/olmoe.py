"""OLMoE (model_type olmoe): every block an MoE, softmax top-k router (renormalised if
norm_topk_prob), and RMSNorm over the whole q and the whole k projection (QK-norm "proj"),
gains of num_attention_heads x head_dim and num_key_value_heads x head_dim features, where
head_dim is hidden_size / num_attention_heads.
"""

from __future__ import annotations

from checkpoint.hf.hf_config import (PLAIN_ROUTER, HFConfig, decoder_from_hf, decoder_to_hf,
                                     require, routing_from_hf)
from checkpoint.hf.qwen_moe import PER_EXPERT
from checkpoint.hf.table import Family
from model.config import ModelConfig, MoEConfig

# Ours under layers.{i}.ffn. -> HF under model.layers.{i}.mlp. (experts as Qwen's)
MOE_BLOCK = {"router.weight": "gate.weight"}


def config_from_hf(config: dict) -> tuple[ModelConfig, MoEConfig]:
    c = HFConfig(config, "olmoe")
    c.expect("clip_qkv", (None,), None, "q, k and v are not clipped")
    c.expect("attention_bias", (False,), False, "only q/k/v biases without an output bias are")
    hidden = c.get("intermediate_size")
    model = decoder_from_hf(c, ffn_hidden=hidden, head_dim_key=False, qk_norm="proj")
    moe = MoEConfig(num_experts=c.get("num_experts", alias="num_local_experts"), expert_hidden=hidden,
                    renormalize=bool(c.get("norm_topk_prob", False)), **routing_from_hf(c, 0.01))
    c.finish()
    moe.validate()
    return model, moe


def config_to_hf(model: ModelConfig, moe: MoEConfig) -> dict:
    require("olmoe", model, moe, PLAIN_ROUTER | {
        "model.head_dim": (None, model.dim // model.n_heads), "model.qk_norm": "proj",
        "model.qkv_bias": False, "moe.every_n_layers": 1, "moe.dense_layers": (None, []),
        "moe.shared_expert_hidden": 0})
    return decoder_to_hf("olmoe", "OlmoeForCausalLM", model, moe, head_dim_key=False) | {
        "num_experts": moe.num_experts, "intermediate_size": moe.expert_hidden,
        "norm_topk_prob": moe.renormalizes, "clip_qkv": None, "attention_bias": False}


OLMOE = Family("olmoe", "OlmoeForCausalLM", MOE_BLOCK, PER_EXPERT, config_from_hf, config_to_hf)
