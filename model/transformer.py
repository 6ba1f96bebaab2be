"""Decoder-only transformer LM whose feed-forward is an MoE layer every n-th block.

Built plainly, as for one device; parallelism is applied afterwards as a transform
(parallel.expert_parallel). Shape legend: B batch, S sequence, D model dim, V vocabulary,
L MoE layers, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from model.config import ModelConfig, MoEConfig, check_recompute
from model.kv_cache import KVCache
from model.layers import Attention, RMSNorm, SwiGLU, rotary_tables
from model.moe import MoELayer, RouterOutput, build_moe


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, S, V) next-token logits."""
    loss: torch.Tensor | None
    """lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss (None without targets)."""
    lm_loss: torch.Tensor | None
    """Mean cross-entropy over this rank's tokens."""
    aux_loss: torch.Tensor
    """Load-balancing loss, unscaled, in moe.aux_loss_form: per_layer, the mean over MoE layers
    (1.0 = balanced); pooled, once over the layers pooled (top_k = balanced). 0 without MoE."""
    z_loss: torch.Tensor
    """Router z-loss, mean over MoE layers, unscaled."""
    expert_counts_LE: torch.Tensor
    """Token-slots per expert per MoE layer from this rank's tokens (int64, no grad)."""
    router_entropy_L: torch.Tensor
    """Mean router entropy per MoE layer, nats (no grad)."""
    dropped_slots_L: torch.Tensor
    """Token-slots dropped for lack of capacity per MoE layer on this rank (0 when dropless)."""


def _recomputed(fn, *args):
    """fn(*args), keeping none of its activations: backward runs it again to get them
    (torch.utils.checkpoint, non-reentrant: any outputs, autocast and the RNG state restored,
    and the recomputed tensors checked against the first run's shapes and dtypes).

    The rerun goes to the end of fn: torch's early stop would end it inside fn, at the last
    tensor backward needs, so whatever fn does after that (the tp collectives that close the
    region, the deepspeed backend dropping the aux loss MOELayer keeps) would happen only the
    first time. What follows that tensor is cheap (the combine's weighted sum, a residual add).
    """
    with set_checkpoint_early_stop(False):
        return checkpoint(fn, *args, use_reentrant=False)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = ffn
        self.recompute = "none"  # TransformerLM.set_recompute

    def forward(self, h, cos, sin, cache=None, start: int = 0) -> tuple[torch.Tensor, RouterOutput | None]:
        if self.recompute == "full" and torch.is_grad_enabled():
            return _recomputed(self._forward, h, cos, sin, cache, start)
        return self._forward(h, cos, sin, cache, start)

    def _forward(self, h, cos, sin, cache, start) -> tuple[torch.Tensor, RouterOutput | None]:
        h = h + self.attention(self.attention_norm(h), cos, sin, cache, start)
        if self.recompute == "ffn" and torch.is_grad_enabled():
            out, route = _recomputed(self._feed_forward, h)
        else:
            out, route = self._feed_forward(h)
        return h + out, route

    def _feed_forward(self, h) -> tuple[torch.Tensor, RouterOutput | None]:
        if isinstance(self.ffn, MoELayer):
            return self.ffn(self.ffn_norm(h))
        return self.ffn(self.ffn_norm(h)), None


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig):
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg, build_moe(cfg.dim, moe) if moe.is_moe_layer(i) else SwiGLU(cfg.dim, cfg.ffn_hidden))
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rotary_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix; the projections that write into the residual
        stream (attention wo, FFN w2, experts' w2) scaled by 1/sqrt(2 * n_layers) (GPT-2);
        biases 0, RMSNorm gains 1."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:  # RMSNorm gains
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight", "w2_EFD")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, std)

    def compile_modules(self) -> None:
        """torch.compile the attention, the norms and the dense FFNs (shared experts included) in
        place (train.compile), and the native MoE layers' elementwise work around their GEMMs
        (compile_kernels).

        Per module, not the whole model: the MoE layers' dispatch has data-dependent sizes,
        custom autograd functions and collectives, which would split the graph anyway, while
        the blocks' dense modules are the same code with the same shapes, so every block shares
        one compiled graph per module type (checked: no recompilation across blocks).
        `nn.Module.compile` keeps parameter names, so checkpoints do not change.
        """
        for block in self.layers:
            block.attention_norm.compile()
            block.attention.compile()
            block.ffn_norm.compile()
            if isinstance(block.ffn, MoELayer):
                block.ffn.compile_kernels()
                if block.ffn.shared is not None:
                    block.ffn.shared.compile()
            else:
                block.ffn.compile()
        self.norm.compile()

    def set_recompute(self, mode: str) -> None:
        """train.recompute: none, ffn (each block's feed-forward runs again in backward) or full
        (each whole block does). Training only: under no_grad nothing is kept anyway."""
        check_recompute(mode)
        for block in self.layers:
            block.recompute = mode

    def update_expert_bias(self, counts_LE: torch.Tensor, rate: float) -> None:
        """moe.bias_update_rate: move each MoE layer's router bias towards balance, from the
        token-slots per expert of one optimizer step's global batch (every rank passes the
        same counts, so the biases stay equal everywhere)."""
        for layer, counts_E in zip(self.moe_layers(), counts_LE, strict=True):
            layer.router.update_bias(counts_E, rate)

    def _aux_loss(self, routes: list[RouterOutput]) -> torch.Tensor:
        """moe.aux_loss_form: the mean of the layers' own losses, or one over the pooled layers
        (transformers' load_balancing_loss_func: f_e = choices of e per token, P_e = mean
        probability, each averaged over the layers)."""
        if self.moe_cfg.aux_loss_form == "per_layer":
            return torch.stack([r.aux_loss for r in routes]).mean()
        counts_LE = torch.stack([r.counts_E for r in routes]).float()
        tokens = counts_LE.sum() / self.moe_cfg.top_k  # every layer routes the same tokens
        prob_E = torch.stack([r.mean_prob_E for r in routes]).mean(0)
        return self.moe_cfg.num_experts * torch.sum(counts_LE.sum(0) / tokens * prob_E)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoELayer)]

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None,
                cache: KVCache | None = None, start: int = 0) -> ModelOutput:
        """Next-token logits (and losses, given targets) for tokens_BS. With a `cache`
        (incremental decoding) the tokens sit at positions [start, start + S): their keys and
        values are stored there and they attend to the cache's earlier positions too."""
        S = tokens_BS.shape[1]
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length ({start + S}) exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        h_BSD = self.tok_embeddings(tokens_BS)
        routes: list[RouterOutput] = []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layer(i)
            h_BSD, route = block(h_BSD, self.rope_cos, self.rope_sin, layer_cache, start)
            if route is not None:
                routes.append(route)
        logits = self.output(self.norm(h_BSD)).float()

        zero = logits.new_zeros(())
        aux = self._aux_loss(routes) if routes else zero
        z = torch.stack([r.z_loss for r in routes]).mean() if routes else zero
        counts = torch.stack([r.counts_E for r in routes]) if routes else torch.zeros(0, 0, dtype=torch.long)
        entropy = torch.stack([r.entropy for r in routes]) if routes else logits.new_zeros(0)
        no_drops = torch.zeros((), dtype=torch.long, device=logits.device)
        dropped = torch.stack([no_drops if r.dropped_slots is None else r.dropped_slots.to(no_drops.device)
                               for r in routes]) if routes else no_drops.new_zeros(0)
        loss = lm_loss = None
        if targets_BS is not None:
            lm_loss = F.cross_entropy(logits.flatten(0, 1), targets_BS.flatten())
            loss = lm_loss + self.moe_cfg.aux_loss_coef * aux + self.moe_cfg.z_loss_coef * z
        return ModelOutput(logits, loss, lm_loss, aux, z, counts, entropy, dropped)
