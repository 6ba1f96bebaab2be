"""Typed schema of the model: the transformer and its MoE layers.

These dataclasses are the model's own arguments; `launcher.config` composes them with the
parallel, train, data, checkpoint and logging sections into one job config. They hold plain
values only (no devices, groups or callables). `validate()` checks what the model alone can
check; cross-section checks (num_experts vs the expert-parallel size) live in the job config.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.errors import ConfigError, check_choice, check_positive

MOE_BACKENDS = ("native",)
EXPERT_IMPLS = ("grouped_mm", "loop")


@dataclass
class ModelConfig:
    """Decoder-only transformer: RMSNorm, rotary attention, SwiGLU feed-forward."""

    vocab_size: int = 256
    """Vocabulary size; 256 for the built-in byte-level data."""
    dim: int = 128
    """Hidden size of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; dim must be divisible by n_heads (head_dim = dim / n_heads)."""
    ffn_hidden: int = 384
    """Hidden size of the dense SwiGLU feed-forward (blocks that are not MoE)."""
    max_seq_len: int = 256
    """Longest sequence the rotary tables are built for."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix."""
    tie_embeddings: bool = False
    """Share the token embedding with the output projection."""

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            check_positive(f"model.{name}", getattr(self, name))
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(
                f"head_dim = model.dim / model.n_heads ({self.dim // self.n_heads}) must be even "
                "for rotary embeddings"
            )
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(
                f"model.init_std ({self.init_std}), model.norm_eps ({self.norm_eps}) and "
                f"model.rope_theta ({self.rope_theta}) must be > 0"
            )


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward: softmax router, top-k experts per token, dropless."""

    num_experts: int = 8
    """Experts per MoE layer (global count; each expert-parallel rank owns num_experts / ep)."""
    top_k: int = 2
    """Experts each token is sent to (1 <= top_k <= num_experts)."""
    expert_hidden: int = 128
    """Hidden size of each SwiGLU expert."""
    every_n_layers: int = 1
    """Blocks i with (i + 1) % every_n_layers == 0 use an MoE FFN; 1 = every block, 0 = none."""
    renormalize: bool = True
    """Rescale each token's top-k router probabilities to sum to 1."""
    aux_loss_coef: float = 0.01
    """Coefficient of the load-balancing loss (Switch/GShard form; 1.0 when perfectly balanced)."""
    z_loss_coef: float = 0.001
    """Coefficient of the router z-loss (mean squared logsumexp of the router logits)."""
    backend: str = "native"
    """MoE implementation: native (dropless, all-to-all over the expert-parallel group)."""
    expert_impl: str = "grouped_mm"
    """Expert compute: grouped_mm (one grouped GEMM per projection) or loop (readable reference)."""

    def validate(self) -> None:
        check_positive("moe.num_experts", self.num_experts)
        check_positive("moe.expert_hidden", self.expert_hidden)
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"moe.top_k ({self.top_k}) must be between 1 and moe.num_experts "
                f"({self.num_experts})"
            )
        if self.every_n_layers < 0:
            raise ConfigError(f"moe.every_n_layers ({self.every_n_layers}) must be >= 0")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ConfigError(
                f"moe.aux_loss_coef ({self.aux_loss_coef}) and moe.z_loss_coef "
                f"({self.z_loss_coef}) must be >= 0"
            )
        check_choice("moe.backend", self.backend, MOE_BACKENDS)
        check_choice("moe.expert_impl", self.expert_impl, EXPERT_IMPLS)

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.every_n_layers > 0 and (layer_id + 1) % self.every_n_layers == 0

