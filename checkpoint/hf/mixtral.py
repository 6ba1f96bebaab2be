"""Mixtral (model_type mixtral): every block an MoE of SwiGLU experts, softmax top-k router
that always renormalises (at top_k 1 too), grouped-query attention, no biases, no QK-norm.

Files written by save_pretrained keep the original names, `block_sparse_moe.gate` and
`block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down); transformers' modules hold the
router as `mlp.gate` and the experts fused (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`).
"""

from __future__ import annotations

from checkpoint.hf.hf_config import (PLAIN_ROUTER, HFConfig, decoder_from_hf, decoder_to_hf,
                                     require, routing_from_hf)
from checkpoint.hf.table import Family
from model.config import ModelConfig, MoEConfig

# Ours under layers.{i}.ffn. -> HF under model.layers.{i}.block_sparse_moe. (files) or .mlp.
MOE_BLOCK = {"router.weight": "gate.weight"}
PER_EXPERT = ("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight")


def config_from_hf(config: dict) -> tuple[ModelConfig, MoEConfig]:
    c = HFConfig(config, "mixtral")
    hidden = c.get("intermediate_size")
    c.expect("sliding_window", (None,), None, "attention is full, not a sliding window")
    c.expect("router_jitter_noise", (0, 0.0), 0.0, "the router has no input jitter")
    model = decoder_from_hf(c, ffn_hidden=hidden)  # no dense blocks: ffn_hidden is unused
    moe = MoEConfig(num_experts=c.get("num_local_experts", alias="num_experts"), expert_hidden=hidden,
                    renormalize=True, **routing_from_hf(c, 0.001))
    c.finish()
    moe.validate()
    return model, moe


def config_to_hf(model: ModelConfig, moe: MoEConfig) -> dict:
    require("mixtral", model, moe, PLAIN_ROUTER | {
        "model.qkv_bias": False, "model.qk_norm": "none", "moe.every_n_layers": 1,
        "moe.dense_layers": (None, []), "moe.shared_expert_hidden": 0, "moe.renormalizes": True})
    return decoder_to_hf("mixtral", "MixtralForCausalLM", model, moe) | {
        "num_local_experts": moe.num_experts, "intermediate_size": moe.expert_hidden,
        "sliding_window": None, "router_jitter_noise": 0.0}


MIXTRAL = Family("mixtral", "MixtralForCausalLM", MOE_BLOCK, PER_EXPERT, config_from_hf,
                 config_to_hf, moe_prefix={"per_expert": "block_sparse_moe", "fused": "mlp"})
