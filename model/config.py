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
QK_NORMS = ("none", "head", "proj")
SCORE_FUNCS = ("softmax", "sigmoid")
AUX_LOSS_FORMS = ("per_layer", "pooled")

# The fields that fix parameter shapes, per section: a checkpoint (ours or an imported one) only
# fits a model that agrees on every one of them. A new field that adds, removes or reshapes a
# parameter or a persistent buffer belongs here; its default must reproduce the model before it.
ARCHITECTURE = {"model": ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "tie_embeddings",
                          "n_kv_heads", "head_dim", "qkv_bias", "qk_norm"),
                "moe": ("num_experts", "expert_hidden", "every_n_layers", "shared_expert_hidden",
                        "shared_expert_gate", "first_k_dense", "dense_layers")}
# The routers' expert bias (a persistent buffer) exists when MoEConfig.has_expert_bias; whether
# a checkpoint's bias may be dropped or added is checkpoint/compat.py's and load_weights' rule.


def check_expert_parallel(num_experts: int, ep: int) -> None:
    """Expert parallelism splits the experts evenly: the one place this is checked."""
    if num_experts % ep:
        raise ConfigError(f"moe.num_experts ({num_experts}) must be divisible by parallel.ep ({ep})")


def check_recompute(mode: str) -> None:
    """train.recompute's values, checked by the config and by TransformerLM.set_recompute."""
    check_choice("train.recompute", mode, RECOMPUTE)


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
    """Query heads; with head_dim null, dim must be divisible by n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention): query head h reads key/value head
    h // (n_heads / n_kv_heads), as transformers' repeat_kv does. null = n_heads (multi-head).
    Tensor parallelism splits both kinds of head, so both must be divisible by parallel.tp."""
    head_dim: int | None = None
    """Features per attention head; null = dim / n_heads. Set, q has n_heads * head_dim
    features and k, v n_kv_heads * head_dim, whatever dim is (Qwen3). Even (rotary pairs)."""
    qkv_bias: bool = False
    """A bias on the q, k and v projections (Qwen2); the output projection has none."""
    qk_norm: str = "none"
    """RMSNorm of queries and keys, before rotary: none; head (over each head's head_dim
    features, one gain of head_dim for all heads: Qwen3); proj (over all of q's and all of k's
    features, gains of n_heads * head_dim and n_kv_heads * head_dim: OLMoE; under tensor
    parallelism the sum of squares is all-reduced over the tp group)."""
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

    @property
    def kv_heads(self) -> int:
        """model.n_kv_heads with its default resolved."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """model.head_dim with its default resolved."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            check_positive(f"model.{name}", getattr(self, name))
        for name in ("n_kv_heads", "head_dim"):
            if getattr(self, name) is not None:
                check_positive(f"model.{name}", getattr(self, name))
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(
                f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}) "
                "when model.head_dim is null"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads "
                f"({self.n_kv_heads}): each key/value head serves a whole group of query heads"
            )
        if self.head_size % 2:
            raise ConfigError(
                f"the head size ({self.head_size}: model.head_dim, or model.dim / model.n_heads) "
                "must be even for rotary embeddings"
            )
        check_choice("model.qk_norm", self.qk_norm, QK_NORMS)
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
    """Blocks i with (i + 1) % every_n_layers == 0 use an MoE FFN; 1 = every block, 0 = none
    (transformers' decoder_sparse_step). first_k_dense and dense_layers exclude more blocks."""
    first_k_dense: int = 0
    """The first this-many blocks use a dense FFN whatever every_n_layers says (DeepSeek-V3's
    first_k_dense_replace). 0 = none."""
    dense_layers: list[int] | None = None
    """Indices of blocks that use a dense FFN whatever every_n_layers says (Qwen-MoE's
    mlp_only_layers), e.g. [0, 5]. null = none."""
    shared_expert_hidden: int = 0
    """Hidden size of a shared expert: a dense SwiGLU that every token passes through, its
    output added to the routed experts' (DeepSeekMoE's shared experts, as one wider MLP).
    0 = none. Any backend; under tensor parallelism it is split like a dense FFN."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output per token by sigmoid(x . g), g a learned (1, dim)
    weight (Qwen2-MoE's shared_expert_gate); replicated under tensor parallelism. Needs
    shared_expert_hidden > 0."""
    score_func: str = "softmax"
    """Router scores from the logits: softmax over the experts, or sigmoid of each logit on its
    own (DeepSeek-V3). The top-k are chosen on the scores (plus the expert bias, if any) and
    their combine weights are the chosen scores (renormalised if configured)."""
    renormalize: bool | None = None
    """Rescale each token's top-k scores to sum to 1. None (the default): when top_k > 1. At
    top_k 1 renormalising makes every combine weight exactly 1 (Mixtral, whose router always
    renormalises): the router then gets no gradient from the language-model loss and learns
    from the load-balancing loss only, where Switch's unrenormalised weight lets it learn
    from both."""
    n_group: int = 1
    """Group-limited routing (DeepSeek-V3's n_group): the experts form n_group equal groups of
    consecutive ids; a group's score is the sum of its two best scores (bias included); each
    token chooses its top_k experts among its topk_group best groups only. 1 = no groups."""
    topk_group: int = 1
    """Groups each token may choose from (DeepSeek-V3's topk_group), 1 <= topk_group <= n_group;
    equal to n_group, every group is allowed. Read only when n_group > 1."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' combine weights after any renormalisation (DeepSeek-V3's
    routed_scaling_factor); the shared expert is not scaled."""
    aux_loss_coef: float = 0.01
    """Coefficient of the load-balancing loss (its form: aux_loss_form)."""
    aux_loss_form: str = "per_layer"
    """per_layer (ours): E * sum_e f_e P_e in each MoE layer, f_e the share of the layer's
    token-slots routed to expert e and P_e its mean router probability, averaged over the
    layers; 1.0 when balanced. pooled (transformers' load_balancing_loss_func, the convention
    of Mixtral, Qwen-MoE and OLMoE checkpoints): f_e and P_e are pooled over the MoE layers
    first, f_e counting choices per token (summing to top_k), then E * sum_e f_e P_e once;
    top_k when balanced. With one MoE layer, or layers that route alike, pooled = top_k x
    per_layer: transformers' router_aux_loss_coef c matches aux_loss_coef c in the pooled
    form and about top_k x c in the per_layer form. P is the softmax; with score_func sigmoid,
    each token's scores divided by their sum."""
    z_loss_coef: float = 0.001
    """Coefficient of the router z-loss (mean squared logsumexp of the router logits)."""
    bias_update_rate: float = 0.0
    """Load balancing without an auxiliary loss (DeepSeek-V3; Megatron's
    moe_router_bias_update_rate): each MoE layer keeps a per-expert bias that is added to the
    router probabilities to choose the top-k (the combine weights stay the unbiased
    probabilities), and after every optimizer step each bias moves by this rate towards
    balance: up for experts that got fewer token-slots than the mean over the global batch,
    down for those that got more. 0 = off (no bias). Usually with a small or zero
    aux_loss_coef. Native and megablocks backends (DeepSpeed's gate chooses its own experts).
    With score_func sigmoid the bias is added to the sigmoid scores (DeepSeek-V3)."""
    expert_bias: bool = False
    """Keep the per-expert choice bias of bias_update_rate as state even when the rate is 0:
    a fixed bias, e.g. DeepSeek-V3's e_score_correction_bias of an imported checkpoint. Native
    and megablocks backends."""
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
        check_choice("moe.backend", self.backend, MOE_BACKENDS)
        if self.bias_update_rate < 0:
            raise ConfigError(f"moe.bias_update_rate ({self.bias_update_rate}) must be >= 0 (0 = off)")
        self._validate_routing()
        self._validate_layer_pattern()
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

    def _validate_routing(self) -> None:
        check_choice("moe.score_func", self.score_func, SCORE_FUNCS)
        check_choice("moe.aux_loss_form", self.aux_loss_form, AUX_LOSS_FORMS)
        if self.shared_expert_gate and not self.shared_expert_hidden:
            raise ConfigError("moe.shared_expert_gate true needs a shared expert: "
                              "moe.shared_expert_hidden is 0")
        if not self.routed_scaling_factor > 0:
            raise ConfigError(f"moe.routed_scaling_factor ({self.routed_scaling_factor}) must be > 0")
        check_positive("moe.n_group", self.n_group)
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            if self.num_experts % self.n_group or per_group < 2:
                raise ConfigError(
                    f"moe.num_experts ({self.num_experts}) must be divisible by moe.n_group "
                    f"({self.n_group}) into groups of at least 2 experts (a group scores by its "
                    "two best)")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"moe.topk_group ({self.topk_group}) must be between 1 and "
                                  f"moe.n_group ({self.n_group})")
            if self.top_k > self.topk_group * per_group:
                raise ConfigError(
                    f"moe.top_k ({self.top_k}) exceeds the experts of moe.topk_group "
                    f"({self.topk_group}) groups of {per_group}")
        if self.backend == "deepspeed":
            # DeepSpeed's gate chooses and weights the experts itself: softmax top-k, no bias.
            ours_only = [f"moe.{n} ({getattr(self, n)!r})" for n in
                         ("score_func", "n_group", "routed_scaling_factor", "expert_bias",
                          "bias_update_rate", "aux_loss_form")
                         if getattr(self, n) != getattr(MoEConfig, n)]
            if ours_only:
                raise ConfigError(
                    f"{', '.join(ours_only)} {'need' if len(ours_only) > 1 else 'needs'} our "
                    "router to choose the experts; in the deepspeed backend DeepSpeed's gate "
                    "chooses them (softmax top-k, no bias, its own load-balancing loss): use the "
                    "native or megablocks backend")

    def _validate_layer_pattern(self) -> None:
        if self.first_k_dense < 0:
            raise ConfigError(f"moe.first_k_dense ({self.first_k_dense}) must be >= 0")
        dense = self.dense_layers or []
        if any(i < 0 for i in dense) or len(set(dense)) != len(dense):
            raise ConfigError(f"moe.dense_layers ({self.dense_layers}) must list distinct block "
                              "indices >= 0")

    @property
    def has_expert_bias(self) -> bool:
        """Whether the routers keep a choice bias (moe.expert_bias or moe.bias_update_rate)."""
        return self.expert_bias or self.bias_update_rate > 0

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
        return (self.every_n_layers > 0 and (layer_id + 1) % self.every_n_layers == 0
                and layer_id >= self.first_k_dense and layer_id not in (self.dense_layers or ()))

