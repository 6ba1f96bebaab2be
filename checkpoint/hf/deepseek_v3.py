"""DeepSeek-V3 (model_type deepseek_v3): its MoE block only. Its attention, multi-head latent
attention (low-rank q and kv projections, a rotary part and a plain part of each head), is not
ours, so a whole model is refused; the MoE block maps exactly:

    scores   sigmoid of the router logits (fp32)
    choice   top n_group groups by the sum of their two best (score + e_score_correction_bias),
             then the top_k experts of those groups by score + bias (the bias only chooses)
    weights  the chosen unbiased scores, renormalised if norm_topk_prob, x routed_scaling_factor
    shared   n_shared_experts experts as one SwiGLU of n_shared_experts x moe_intermediate_size
    blocks   the first first_k_dense_replace blocks are dense (intermediate_size)
"""

from __future__ import annotations

from checkpoint.hf.hf_config import HFConfig
from checkpoint.hf.qwen_moe import PER_EXPERT
from checkpoint.hf.table import Family
from model.config import ModelConfig, MoEConfig
from model.errors import ConfigError

# Ours under layers.{i}.ffn. -> HF under model.layers.{i}.mlp. (experts as Qwen's)
MOE_BLOCK = {"router.weight": "gate.weight",
             "router.expert_bias": "gate.e_score_correction_bias",
             "shared.w1.weight": "shared_experts.gate_proj.weight",
             "shared.w3.weight": "shared_experts.up_proj.weight",
             "shared.w2.weight": "shared_experts.down_proj.weight"}


def moe_config_from_hf(config: dict) -> MoEConfig:
    """The MoE block's fields (and the dense-block pattern); the rest of the config is not read."""
    c = HFConfig(config, "deepseek_v3")
    c.expect("hidden_act", ("silu",), "silu", "the experts are SwiGLU (silu)")
    hidden = c.get("moe_intermediate_size")
    moe = MoEConfig(
        num_experts=c.get("n_routed_experts", alias="num_local_experts"), top_k=c.get("num_experts_per_tok"),
        expert_hidden=hidden, shared_expert_hidden=c.get("n_shared_experts") * hidden,
        score_func="sigmoid", expert_bias=True, n_group=c.get("n_group"),
        topk_group=c.get("topk_group"), routed_scaling_factor=float(c.get("routed_scaling_factor")),
        renormalize=bool(c.get("norm_topk_prob")), first_k_dense=c.get("first_k_dense_replace"),
        aux_loss_coef=0.0, z_loss_coef=0.0)
    moe.validate()
    return moe


def config_from_hf(config: dict) -> tuple[ModelConfig, MoEConfig]:
    raise ConfigError(
        f"deepseek_v3 attention is multi-head latent attention (kv_lora_rank="
        f"{config.get('kv_lora_rank')}, q_lora_rank={config.get('q_lora_rank')}, "
        f"qk_rope_head_dim={config.get('qk_rope_head_dim')}), which model.Attention cannot "
        "represent; only its MoE block maps (checkpoint.hf.deepseek_v3.moe_config_from_hf)")


def config_to_hf(model: ModelConfig, moe: MoEConfig) -> dict:
    raise ConfigError("deepseek_v3 attention is multi-head latent attention, which our model "
                      "does not have: a whole model cannot be exported as deepseek_v3")


DEEPSEEK_V3 = Family("deepseek_v3", "DeepseekV3ForCausalLM", MOE_BLOCK, PER_EXPERT,
                     config_from_hf, config_to_hf)
