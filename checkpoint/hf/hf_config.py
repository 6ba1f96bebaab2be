"""HF config.json <-> our ModelConfig and MoEConfig: the parts every family shares.

A family's mapping reads its config.json key by key through `HFConfig`; `finish` then refuses
every key nobody read (beyond GENERIC), so a field the model cannot represent is named with
its value rather than silently dropped. The inverse writes the keys transformers' config class of the family reads,
after `require` has refused what the family cannot express.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig, MoEConfig
from model.errors import ConfigError

# Keys about tokens, outputs or the file, not the computation. (pad_token_id: transformers'
# embedding keeps that row's gradient at zero, ours trains it; it matters only where the pad
# token occurs in the training data.)
GENERIC = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "output_router_logits",
    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
    "id2label", "label2id", "is_encoder_decoder", "problem_type", "tokenizer_class",
})
_MISSING = object()


class HFConfig:
    """A config.json dict, read key by key."""

    def __init__(self, config: dict, model_type: str):
        if config.get("model_type") != model_type:
            raise ConfigError(f"config model_type is {config.get('model_type')!r}, not {model_type!r}")
        self.config, self.model_type, self.seen = config, model_type, set()

    def get(self, key: str, default: Any = _MISSING, alias: str | None = None) -> Any:
        """The value of `key` (or of `alias`); `default` when absent, an error when no default."""
        for k in (key, alias):
            if k is not None and k in self.config:
                self.seen.add(k)
                return self.config[k]
        if default is _MISSING:
            raise ConfigError(f"{self.model_type} config has no {key}")
        return default

    def expect(self, key: str, allowed: tuple, default: Any, why: str) -> Any:
        """The value of `key`, refused unless in `allowed`: `why` says what it would need."""
        value = self.get(key, default)
        if value not in allowed:
            raise ConfigError(f"{self.model_type} {key}={value!r} cannot be represented: {why}")
        return value

    def finish(self) -> None:
        left = sorted(set(self.config) - self.seen - GENERIC)
        if left:
            raise ConfigError(f"{self.model_type} config fields the model cannot represent: "
                              + ", ".join(f"{k}={self.config[k]!r}" for k in left))


def rope_theta(c: HFConfig, default: float) -> float:
    """rope_theta from transformers 5's rope_parameters or the older rope_theta/rope_scaling;
    only the default rotary embedding (no scaling of any type) is representable."""
    params = c.get("rope_parameters", None)
    scaling = c.get("rope_scaling", None)
    theta = c.get("rope_theta", default)
    for what, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        kind = value.get("rope_type", value.get("type", "default")) if isinstance(value, dict) else value
        extra = set(value) - {"rope_type", "type", "rope_theta"} if isinstance(value, dict) else set()
        if kind != "default" or extra:
            raise ConfigError(f"{c.model_type} {what}={value!r} cannot be represented: only the "
                              "default rotary embedding (rope_type default, rope_theta) is")
        theta = value.get("rope_theta", theta)
    return float(theta)


def decoder_from_hf(c: HFConfig, ffn_hidden: int, head_dim_key: bool = True, **extra) -> ModelConfig:
    """The llama-style decoder every family shares; `extra`: further ModelConfig fields."""
    dim, heads = c.get("hidden_size"), c.get("num_attention_heads")
    kv_heads = c.get("num_key_value_heads", None)
    head_dim = c.get("head_dim", None) if head_dim_key else None
    c.expect("hidden_act", ("silu",), "silu", "the FFNs and experts are SwiGLU (silu)")
    c.expect("attention_dropout", (0, 0.0), 0.0, "attention has no dropout")
    if head_dim is not None and not dim % heads and head_dim == dim // heads:
        head_dim = None
    model = ModelConfig(
        vocab_size=c.get("vocab_size"), dim=dim, n_layers=c.get("num_hidden_layers"),
        n_heads=heads, n_kv_heads=None if kv_heads in (None, heads) else kv_heads,
        head_dim=head_dim, ffn_hidden=ffn_hidden,
        max_seq_len=c.get("max_position_embeddings"), rope_theta=rope_theta(c, 10000.0),
        norm_eps=float(c.get("rms_norm_eps")), init_std=float(c.get("initializer_range", 0.02)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), **extra)
    model.validate()
    return model


def routing_from_hf(c: HFConfig, aux_coef_default: float) -> dict:
    """MoEConfig fields for transformers' router and its pooled load-balancing loss. Its
    coefficient applies in transformers only with output_router_logits; here always."""
    return dict(top_k=c.get("num_experts_per_tok"), aux_loss_form="pooled", z_loss_coef=0.0,
                aux_loss_coef=float(c.get("router_aux_loss_coef", aux_coef_default)))


def require(model_type: str, model: ModelConfig, moe: MoEConfig, values: dict[str, Any]) -> None:
    """Refuse to export what `model_type` cannot express: `values` maps "section.field" to the
    only value it can (a tuple: any of them)."""
    bad = []
    for dotted, allowed in values.items():
        section, field = dotted.split(".")
        value = getattr(model if section == "model" else moe, field)
        if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            bad.append(f"{dotted} ({value!r}, {model_type} needs {allowed!r})")
    if bad:
        raise ConfigError(f"{model_type} cannot express {', '.join(bad)}")


def decoder_to_hf(model_type: str, architecture: str, model: ModelConfig, moe: MoEConfig,
                  head_dim_key: bool = True) -> dict:
    """The keys of the shared decoder and router, in transformers' names."""
    out = {
        "model_type": model_type, "architectures": [architecture],
        "vocab_size": model.vocab_size, "hidden_size": model.dim,
        "num_hidden_layers": model.n_layers, "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps,
        "initializer_range": model.init_std, "tie_word_embeddings": model.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "attention_dropout": 0.0, "num_experts_per_tok": moe.top_k,
        # transformers' loss is the pooled form; a per_layer coefficient c is about top_k x its.
        "router_aux_loss_coef": moe.aux_loss_coef / (1 if moe.aux_loss_form == "pooled" else moe.top_k),
        "output_router_logits": moe.aux_loss_coef > 0,
    }
    if head_dim_key:
        out["head_dim"] = model.head_size
    return out


# Our routing fields that only DeepSeek-V3's config expresses other than by their defaults.
PLAIN_ROUTER = {"moe.score_func": "softmax", "moe.n_group": 1, "moe.routed_scaling_factor": 1.0,
                "moe.has_expert_bias": False, "moe.first_k_dense": 0}
