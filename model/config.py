"""Typed schema of the model: the transformer and its MoE layers.

These dataclasses are the model's own arguments; `launcher.config` composes them with the
parallel, train, data, checkpoint and logging sections into one job config. They hold plain
values only (no devices, groups or callables). `validate()` checks what the model alone can
check; cross-section checks (num_experts vs the expert-parallel size) live in the job config.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.errors import ConfigError, check_choice, check_positive

MOE_BACKENDS = ("native", "deepspeed", "megablocks")
NOISY_GATE_POLICIES = ("none", "jitter", "rsample")
DEEPSPEED_ONLY = ("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens",
                  "use_rts", "noisy_gate_policy", "second_expert_sampling")
EXPERT_IMPLS = ("grouped_mm", "loop")
RECOMPUTE = ("none", "ffn", "full")  # train.recompute, applied by TransformerLM.set_recompute

# The fields that fix parameter shapes, per section: a checkpoint (ours or an imported one) only
# fits a model that agrees on every one of them. A new field that adds, removes or reshapes a
# parameter or a persistent buffer belongs here; its default must reproduce the model before it.
ARCHITECTURE = {"model": ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "tie_embeddings"),
                "moe": ("num_experts", "expert_hidden", "every_n_layers", "shared_expert_hidden")}


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
    shared_expert_hidden: int = 0
    """Hidden size of a shared expert: a dense SwiGLU that every token passes through, its
    output added to the routed experts' (DeepSeekMoE's shared experts, as one wider MLP).
    0 = none. Any backend; under tensor parallelism it is split like a dense FFN."""
    renormalize: bool | None = None
    """Rescale each token's top-k router probabilities to sum to 1. None (the default): when
    top_k > 1. At top_k 1 renormalising makes every combine weight exactly 1, so the router
    would learn from the aux loss only (Switch weights by the probability itself); true is
    refused there."""
    aux_loss_coef: float = 0.01
    """Coefficient of the load-balancing loss (Switch/GShard form; 1.0 when perfectly balanced)."""
    z_loss_coef: float = 0.001
    """Coefficient of the router z-loss (mean squared logsumexp of the router logits)."""
    bias_update_rate: float = 0.0
    """Load balancing without an auxiliary loss (DeepSeek-V3; Megatron's
    moe_router_bias_update_rate): each MoE layer keeps a per-expert bias that is added to the
    router probabilities to choose the top-k (the combine weights stay the unbiased
    probabilities), and after every optimizer step each bias moves by this rate towards
    balance: up for experts that got fewer token-slots than the mean over the global batch,
    down for those that got more. 0 = off (no bias). Usually with a small or zero
    aux_loss_coef. Native and megablocks backends (DeepSpeed's gate chooses its own experts)."""
    backend: str = "native"
    """MoE implementation: native (ours: dropless, uneven all-to-all, grouped GEMM),
    deepspeed (DeepSpeed-MoE's gate and layer: capacity buffers, equal-split all-to-all) or
    megablocks (MegaBlocks' dropless permute kernels and grouped GEMM on our router; CUDA
    only, parallel.tp 1, installed by scripts/install_megablocks.sh)."""
    expert_impl: str = "grouped_mm"
    """Expert compute: grouped_mm (one grouped GEMM per projection) or loop (readable reference)."""
    capacity_factor: float = 1.0
    """deepspeed backend: expert capacity while training = ceil(tokens / E * top_k * this)."""
    eval_capacity_factor: float = 1.0
    """deepspeed backend: the same in eval mode."""
    min_capacity: int = 4
    """deepspeed backend: capacity is at least this many token-slots per expert."""
    drop_tokens: bool = True
    """deepspeed backend: drop token-slots beyond capacity (they then pass through the residual
    and the shared expert only); false = capacity grows to the largest expert load in the ep group, nothing dropped."""
    use_rts: bool = True
    """deepspeed backend, top_k 1: random token selection when dropping (else first come)."""
    noisy_gate_policy: str = "none"
    """deepspeed backend, training only: none, jitter (input x U(0.99, 1.01)) or rsample
    (Gumbel noise on the top-1 choice; top_k 1 only)."""
    second_expert_sampling: bool = False
    """deepspeed backend, top_k 2: pick the second expert with Gumbel noise (DeepSpeed's
    default is true; it stays random in eval mode too)."""

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
        if self.shared_expert_hidden < 0:
            raise ConfigError(
                f"moe.shared_expert_hidden ({self.shared_expert_hidden}) must be >= 0 (0 = no shared expert)"
            )
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ConfigError(
                f"moe.aux_loss_coef ({self.aux_loss_coef}) and moe.z_loss_coef "
                f"({self.z_loss_coef}) must be >= 0"
            )
        if self.renormalize and self.top_k == 1:
            raise ConfigError(
                "moe.renormalize true with moe.top_k 1 makes every combine weight exactly 1: the "
                "router would get no gradient from the loss; leave moe.renormalize unset (null)"
            )
        check_choice("moe.backend", self.backend, MOE_BACKENDS)
        if self.bias_update_rate < 0:
            raise ConfigError(f"moe.bias_update_rate ({self.bias_update_rate}) must be >= 0 (0 = off)")
        if self.bias_update_rate and self.backend == "deepspeed":
            raise ConfigError(
                f"moe.bias_update_rate ({self.bias_update_rate}) needs our router to choose the "
                "experts; in the deepspeed backend DeepSpeed's gate chooses them: use the native "
                "or megablocks backend, or moe.bias_update_rate 0"
            )
        check_choice("moe.expert_impl", self.expert_impl, EXPERT_IMPLS)
        check_choice("moe.noisy_gate_policy", self.noisy_gate_policy, NOISY_GATE_POLICIES)
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0 or self.min_capacity < 0:
            raise ConfigError(
                f"moe.capacity_factor ({self.capacity_factor}) and moe.eval_capacity_factor "
                f"({self.eval_capacity_factor}) must be > 0, moe.min_capacity ({self.min_capacity}) >= 0"
            )
        if self.backend != "native" and self.expert_impl != MoEConfig.expert_impl:
            # Not a silent no-op: only the native backend has a choice of expert kernels.
            kernels = {"deepspeed": "batched matmuls over its capacity buffer",
                       "megablocks": "grouped_gemm's grouped GEMM"}[self.backend]
            raise ConfigError(
                f"moe.expert_impl ({self.expert_impl!r}) does not apply to moe.backend "
                f"{self.backend}, which computes its experts with {kernels}"
            )
        if self.backend == "deepspeed":
            self._validate_deepspeed()
            return
        changed = [f"moe.{n} ({getattr(self, n)!r})" for n in DEEPSPEED_ONLY
                   if getattr(self, n) != getattr(MoEConfig, n)]
        if changed:
            raise ConfigError(
                f"{', '.join(changed)} {'apply' if len(changed) > 1 else 'applies'} only to "
                f"moe.backend deepspeed; the {self.backend} backend is dropless"
                + (" and deterministic" if self.backend == "native" else "")
            )

    @property
    def renormalizes(self) -> bool:
        """moe.renormalize with its default resolved: whether top-k weights are rescaled."""
        return self.top_k > 1 if self.renormalize is None else self.renormalize

    def _validate_deepspeed(self) -> None:
        # DeepSpeed renormalises the k weights for top_k >= 2 and never for top_k 1.
        if self.renormalizes != (self.top_k > 1):
            raise ConfigError(
                f"moe.backend deepspeed with moe.top_k {self.top_k} always uses "
                f"renormalize={self.top_k > 1}; leave moe.renormalize unset (null)"
            )
        if self.noisy_gate_policy == "rsample" and self.top_k != 1:
            raise ConfigError(f"moe.noisy_gate_policy rsample needs moe.top_k 1, not {self.top_k}")

    def deepspeed_gate_args(self) -> dict:
        """This config as DeepSpeed's TopKGate keyword arguments."""
        policy = {"none": None, "jitter": "Jitter", "rsample": "RSample"}[self.noisy_gate_policy]
        return dict(num_experts=self.num_experts, k=self.top_k,
                    capacity_factor=self.capacity_factor,
                    eval_capacity_factor=self.eval_capacity_factor,
                    min_capacity=self.min_capacity, noisy_gate_policy=policy,
                    drop_tokens=self.drop_tokens, use_rts=self.use_rts,
                    top2_2nd_expert_sampling=self.second_expert_sampling)

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.every_n_layers > 0 and (layer_id + 1) % self.every_n_layers == 0

