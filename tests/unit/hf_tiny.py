"""Tiny random transformers models of each family, and ours built from them, for the HF
equivalence tests (tests/unit/test_hf_*.py). fp32, CPU, seconds to build."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from checkpoint.hf import FAMILIES, hf_to_ours
from model.transformer import TransformerLM

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
              tie_word_embeddings=False, rms_norm_eps=1e-6)


def hf_config(model_type: str):
    """Each family with the features it brings, small: GQA everywhere; Qwen2-MoE's q/k/v
    biases, gated shared expert and a dense block (mlp_only_layers); Qwen3-MoE's per-head
    QK-norm, a head_dim of 16 (not 32 / 4) and every other block dense; OLMoE's QK-norm over
    the whole projection; Mixtral's renormalised router."""
    import transformers as tf

    if model_type == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=16, num_hidden_layers=2,
                                num_local_experts=4, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24, num_hidden_layers=3,
                                 num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=48, moe_intermediate_size=16,
                                 num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                 decoder_sparse_step=2, norm_topk_prob=True)
    if model_type == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=16, num_hidden_layers=2, num_experts=4,
                              num_experts_per_tok=2)
    if model_type == "deepseek_v3":  # the MoE block: 8 experts in 4 groups, 2 shared
        return tf.DeepseekV3Config(**COMMON, moe_intermediate_size=16, n_routed_experts=8,
                                   n_group=4, topk_group=2, num_experts_per_tok=3,
                                   n_shared_experts=2, routed_scaling_factor=2.5,
                                   norm_topk_prob=True, num_hidden_layers=2)
    raise KeyError(model_type)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights N(0, 0.2) (decisive routing and argmax, far from fp32 ties), norm gains
    1 + N(0, 0.2) and biases N(0, 0.2) (so a permuted or dropped gain or bias shows), and any
    e_score_correction_bias N(0, 0.1), comparable to the sigmoid scores' spread."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name.endswith("e_score_correction_bias"):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        elif t.is_floating_point() and "rotary" not in name and "inv_freq" not in name:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))


def tiny_hf(model_type: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(model_type)).eval()
    randomize_(model, seed)
    return model


def per_expert_state(hf_model, tmp_path) -> dict[str, torch.Tensor]:
    """What save_pretrained writes: the per-expert layout (transformers' modules are fused)."""
    hf_model.save_pretrained(tmp_path)
    return load_file(tmp_path / "model.safetensors")


def ours_from(hf_model, state: dict[str, torch.Tensor]):
    """(our model, family, model config, moe config) holding `state` (either layout)."""
    config = hf_model.config.to_dict()
    family = FAMILIES[config["model_type"]]
    model_cfg, moe_cfg = family.config_from_hf(config)
    ours = TransformerLM(model_cfg, moe_cfg)
    ours.load_state_dict(hf_to_ours(family, state, model_cfg, moe_cfg))
    return ours.eval(), family, model_cfg, moe_cfg


def tiny_script():
    """scripts/tiny_hf_model.py as a module: its writer of both expert layouts, its builder."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "tiny_hf_model.py"
    spec = importlib.util.spec_from_file_location("tiny_hf_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_dirs(hf_model, root, per_expert_shard: str = "40KB") -> dict[str, object]:
    """`hf_model` written in both expert layouts under root/per_expert (save_pretrained, in
    several shards with an index) and root/fused (one file); layout -> directory."""
    script = tiny_script()
    dirs = {layout: root / layout for layout in script.LAYOUTS}
    script.save(hf_model, dirs["per_expert"], "per_expert", per_expert_shard)
    script.save(hf_model, dirs["fused"], "fused")
    return dirs
