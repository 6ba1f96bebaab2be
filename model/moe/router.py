"""Top-k router (softmax or sigmoid scores, optional choice bias and group limit) and its two
auxiliary losses.

Shape legend: T tokens (batch x sequence, flattened), D model dim, E experts (global),
K experts chosen per token, N expert groups, Eg experts per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RouterOutput:
    """What one router call decided. The losses are unscaled; the model applies coefficients."""

    topk_idx_TK: torch.Tensor
    """Global expert id of each token's k choices, best first (int64)."""
    topk_weight_TK: torch.Tensor
    """Combine weight of each choice (fp32; renormalised to sum 1 if configured, then times
    the routed scaling factor)."""
    aux_loss: torch.Tensor
    """Load-balancing loss E * sum_e f_e * P_e: f_e = share of token-slots routed to e
    (not differentiable), P_e = mean router probability of e (softmax; with sigmoid scores,
    each token's scores divided by their sum). Equals 1.0 when balanced."""
    z_loss: torch.Tensor
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    counts_E: torch.Tensor
    """Token-slots per expert from these tokens (int64, no grad): the expert load."""
    entropy: torch.Tensor
    """Mean per-token entropy of the router distribution in nats (no grad)."""
    dropped_slots: torch.Tensor | None = None
    """Token-slots dropped for lack of expert capacity (deepspeed backend with drop_tokens);
    None for dropless backends."""
    mean_prob_E: torch.Tensor | None = None
    """P_e of aux_loss (differentiable), for the loss pooled over layers (moe.aux_loss_form);
    None from the deepspeed backend."""


def count_per_expert(expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert, (E,) int64. `torch.bincount` would do, but on CUDA it reads the largest
    id on the host to size its output: a host synchronisation. A scatter-add of ones into a
    tensor of known size does not (and integer sums do not depend on the order)."""
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_N.device)
    return counts_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))


class _LinearInFp32(torch.autograd.Function):
    """F.linear computed in fp32 that keeps its input for backward in the input's own dtype.

    Autograd on `F.linear(x.float(), w.float())` would keep the fp32 copy of x: twice the bytes
    of a bf16 x, which the block keeps anyway. The fp32 copies here live only inside each call.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_ED):
        ctx.save_for_backward(x_TD, weight_ED)
        return F.linear(x_TD.float(), weight_ED.float())

    @staticmethod
    def backward(ctx, grad_TE):
        x_TD, weight_ED = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            dx = (grad_TE @ weight_ED.float()).to(x_TD.dtype) if need_x else None
            dw = (grad_TE.mT @ x_TD.float()).to(weight_ED.dtype) if need_w else None
        return dx, dw


class TopKRouter(nn.Module):
    """Linear scores in fp32, softmax over the experts or sigmoid of each, then each token's
    top-k.

    With `expert_bias` (moe.bias_update_rate > 0 or moe.expert_bias) the router keeps a
    per-expert bias, a persistent buffer (saved in checkpoints), added to the scores only to
    choose the top-k: the combine weights are the unbiased scores of the chosen experts. The
    trainer moves it after each optimizer step (update_bias) from the global batch's load.
    With `n_group` > 1 a token chooses among the experts of its `topk_group` best groups only
    (a group scores by the sum of its two best biased scores: DeepSeek-V3). `scaling`
    multiplies the final weights.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool,
                 expert_bias: bool = False, score_func: str = "softmax", n_group: int = 1,
                 topk_group: int = 1, scaling: float = 1.0):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.score_func, self.n_group, self.topk_group, self.scaling = score_func, n_group, topk_group, scaling
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)

    def _apply(self, fn, recurse=True):
        # The bias keeps its fp32 values when the module is cast (`.bfloat16()`, as some
        # DeepSpeed versions do to the whole module in bf16 mode): it sums steps of
        # bias_update_rate, and in bf16 a bias of 0.5 would round a step of 1e-3 to 0 or 2e-3.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(self.expert_bias.device)
        return self

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor, rate: float) -> None:
        """bias_e += rate * sign(mean load - load_e): `counts_E` is the token-slots each
        expert got over one optimizer step's global batch (the same on every rank)."""
        load_E = counts_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += rate * torch.sign(load_E.mean() - load_E)

    def _choose(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Each token's top-k expert ids, from the scores plus the bias, within its best groups."""
        choice_TE = scores_TE.detach()
        if self.expert_bias is not None:
            choice_TE = choice_TE + self.expert_bias
        if self.n_group > 1:
            T = choice_TE.shape[0]
            choice_TNEg = choice_TE.view(T, self.n_group, -1)
            group_TN = choice_TNEg.topk(2, dim=-1).values.sum(-1)
            keep_TN = torch.zeros_like(group_TN, dtype=torch.bool).scatter_(
                1, group_TN.topk(self.topk_group, dim=-1).indices, True)
            choice_TE = choice_TNEg.masked_fill(~keep_TN[..., None], float("-inf")).view(T, -1)
        return choice_TE.topk(self.top_k, dim=-1).indices

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        # Scores in fp32 even under bf16 autocast: top-k on rounded logits flips choices.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = _LinearInFp32.apply(x_TD, self.weight)
        if self.score_func == "sigmoid":
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)  # for the aux loss
        else:
            scores_TE = probs_TE = logits_TE.softmax(dim=-1)
        if self.expert_bias is None and self.n_group == 1:
            topk_weight_TK, topk_idx_TK = scores_TE.topk(self.top_k, dim=-1)
        else:  # the bias and groups choose; the weights are the chosen experts' own scores
            topk_idx_TK = self._choose(scores_TE)
            topk_weight_TK = scores_TE.gather(-1, topk_idx_TK)
        if self.renormalize:
            topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
        if self.scaling != 1.0:
            topk_weight_TK = topk_weight_TK * self.scaling

        counts_E = count_per_expert(topk_idx_TK.flatten(), self.num_experts)
        slots = max(topk_idx_TK.numel(), 1)
        mean_prob_E = probs_TE.mean(dim=0)
        aux_loss = self.num_experts * torch.sum(counts_E.float() / slots * mean_prob_E)
        z_loss = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        with torch.no_grad():
            entropy = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
        return RouterOutput(topk_idx_TK, topk_weight_TK, aux_loss, z_loss, counts_E, entropy,
                            mean_prob_E=mean_prob_E)
