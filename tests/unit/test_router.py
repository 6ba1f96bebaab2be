"""Router: top-k choices, weights and both auxiliary losses on hand-computed examples."""

import math

import pytest
import torch

from model.moe.router import TopKRouter


def _router_with_logits(logits_TE: torch.Tensor, top_k: int, renormalize: bool,
                        expert_bias: bool = False, **kwargs) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose logits equal `logits_TE` exactly: x = identity rows, weight = logits^T."""
    T, E = logits_TE.shape
    router = TopKRouter(dim=T, num_experts=E, top_k=top_k, renormalize=renormalize,
                        expert_bias=expert_bias, **kwargs)
    with torch.no_grad():
        router.weight.copy_(logits_TE.T)
    return router, torch.eye(T)


LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                       [0.0, 3.0, 1.0, 0.0],
                       [1.0, 0.0, 0.0, 2.5]])


def test_topk_indices_and_weights_by_hand():
    router, x = _router_with_logits(LOGITS, top_k=2, renormalize=False)
    out = router(x)
    assert out.topk_idx_TK.tolist() == [[0, 1], [1, 2], [3, 0]]
    # token 0: softmax([2,1,0,-1]) = e^[2,1,0,-1] / (e^2+e+1+e^-1)
    z0 = math.exp(2) + math.exp(1) + 1 + math.exp(-1)
    assert out.topk_weight_TK[0].tolist() == pytest.approx([math.exp(2) / z0, math.exp(1) / z0], rel=1e-6)
    z1 = 1 + math.exp(3) + math.exp(1) + 1
    assert out.topk_weight_TK[1].tolist() == pytest.approx([math.exp(3) / z1, math.exp(1) / z1], rel=1e-6)


def test_renormalised_weights_sum_to_one_and_keep_ratio():
    router, x = _router_with_logits(LOGITS, top_k=2, renormalize=True)
    w = router(x).topk_weight_TK
    assert w.sum(-1).tolist() == pytest.approx([1.0, 1.0, 1.0], rel=1e-6)
    # token 0 chose experts 0 and 1: renormalised weights are e^2/(e^2+e) and e/(e^2+e)
    assert w[0].tolist() == pytest.approx([math.exp(2) / (math.exp(2) + math.e),
                                           math.e / (math.exp(2) + math.e)], rel=1e-6)


def test_aux_and_z_loss_by_hand():
    router, x = _router_with_logits(LOGITS, top_k=2, renormalize=False)
    out = router(x)
    probs = LOGITS.softmax(-1)
    # token-slots per expert: expert0: 2 (tokens 0, 2), expert1: 2, expert2: 1, expert3: 1
    assert out.counts_E.tolist() == [2, 2, 1, 1]
    f = torch.tensor([2, 2, 1, 1]) / 6.0
    P = probs.mean(0)
    assert out.aux_loss.item() == pytest.approx(4 * (f * P).sum().item(), rel=1e-6)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in LOGITS.tolist()]
    assert out.z_loss.item() == pytest.approx(sum(v * v for v in lse) / 3, rel=1e-6)
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert out.entropy.item() == pytest.approx(entropy.item(), rel=1e-6)


def test_aux_loss_is_one_when_perfectly_balanced():
    # Uniform probabilities with every expert chosen equally often: E * sum(1/E * 1/E) = 1.
    router, x = _router_with_logits(torch.zeros(4, 4), top_k=1, renormalize=False)
    with torch.no_grad():  # break ties so each token picks a different expert, probs ~uniform
        router.weight.add_(torch.eye(4) * 1e-4)
    out = router(x)
    assert sorted(out.topk_idx_TK.flatten().tolist()) == [0, 1, 2, 3]
    assert out.aux_loss.item() == pytest.approx(1.0, rel=1e-3)


def test_aux_loss_gradient_flows_through_probabilities_only():
    router, x = _router_with_logits(LOGITS, top_k=2, renormalize=True)
    router(x).aux_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_all_tokens_on_one_expert():
    logits = torch.tensor([[0.0, 9.0, 0.0]] * 5)
    router, x = _router_with_logits(logits, top_k=1, renormalize=True)
    out = router(x)
    assert out.topk_idx_TK.flatten().tolist() == [1] * 5
    assert out.counts_E.tolist() == [0, 5, 0]
    assert out.topk_weight_TK.flatten().tolist() == pytest.approx([1.0] * 5)
    # f = (0, 1, 0); P_1 ~ 1: aux ~ E = 3, the maximum imbalance.
    assert out.aux_loss.item() == pytest.approx(3 * logits.softmax(-1)[0, 1].item(), rel=1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
def test_expert_bias_chooses_the_experts_but_the_weights_stay_the_probabilities(renormalize):
    """moe.bias_update_rate: the bias is added to the probabilities for the top-k only."""
    router, x = _router_with_logits(LOGITS, top_k=2, renormalize=renormalize, expert_bias=True)
    plain, _ = _router_with_logits(LOGITS, top_k=2, renormalize=renormalize)
    zero, out = router(x), plain(x)  # a zero bias changes nothing
    assert torch.equal(zero.topk_idx_TK, out.topk_idx_TK)
    torch.testing.assert_close(zero.topk_weight_TK, out.topk_weight_TK)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 2.0, 0.0]))  # expert 2 beats any probability
    biased = router(x)
    assert biased.topk_idx_TK.tolist() == [[2, 0], [2, 1], [2, 3]]
    probs = LOGITS.softmax(-1)
    want = probs.gather(1, biased.topk_idx_TK)
    if renormalize:
        want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(biased.topk_weight_TK, want)
    assert biased.counts_E.tolist() == [1, 1, 3, 1]


def test_bias_update_moves_each_expert_towards_the_mean_load():
    router = TopKRouter(dim=4, num_experts=4, top_k=1, renormalize=False, expert_bias=True)
    router.update_bias(torch.tensor([4, 0, 2, 2]), 0.01)  # mean 2
    assert router.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    router.update_bias(torch.tensor([3, 3, 1, 1]), 0.01)
    assert router.expert_bias.tolist() == pytest.approx([-0.02, 0.0, 0.01, 0.01])


def test_bias_updates_balance_a_skewed_router_without_training_it():
    """The point of the bias: a router whose logits favour two experts (3.2x the mean load)
    spreads its tokens evenly after some updates, with its weights untouched."""
    gen = torch.Generator().manual_seed(0)
    router = TopKRouter(dim=16, num_experts=8, top_k=2, renormalize=True, expert_bias=True)
    with torch.no_grad():
        router.weight.normal_(0, 0.3, generator=gen)
    x = torch.randn(1024, 16, generator=gen)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.weight[:2, 0] += 3.0  # experts 0 and 1 get a large logit for every token

    def imbalance(counts):
        return (counts.max() / counts.float().mean()).item()

    before = imbalance(router(x).counts_E)
    for _ in range(300):
        router.update_bias(router(x).counts_E, 0.01)
    after = imbalance(router(x).counts_E)
    assert before > 3.0 and after < 1.2, (before, after)


def test_expert_bias_is_state_and_stays_fp32_when_the_module_is_cast():
    router = TopKRouter(dim=4, num_experts=4, top_k=1, renormalize=False, expert_bias=True)
    assert "expert_bias" in router.state_dict()
    assert "expert_bias" not in TopKRouter(4, 4, 1, False).state_dict()
    router.expert_bias.copy_(torch.tensor([0.5001, -0.3337, 0.001, 0.0]))  # not bf16 values
    want = router.expert_bias.clone()
    router.bfloat16()  # as some DeepSpeed versions do in bf16 mode
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, want)


# Eight experts in four groups of two: {0, 1} {2, 3} {4, 5} {6, 7}.
GROUPED = torch.tensor([[3.0, -4.0, 2.0, 1.5, 2.5, -4.0, 0.0, 0.0],
                        [0.0, 0.0, 1.0, 1.0, -1.0, 2.0, 1.5, 1.5]])


def test_sigmoid_scores_with_groups_bias_and_scaling_by_hand():
    """DeepSeek-V3's router: sigmoid scores; a group scores by the sum of its two best
    (score + bias); a token chooses its top_k among its topk_group best groups by score +
    bias; the weights are the chosen unbiased scores, renormalised, times the scaling."""
    router, x = _router_with_logits(GROUPED, top_k=2, renormalize=True, expert_bias=True,
                                    score_func="sigmoid", n_group=4, topk_group=2, scaling=2.5)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6]))
    out = router(x)
    s = GROUPED.sigmoid()
    # Token 0, groups by score: {2,3} 1.70, {0,1} 0.97, {4,5} 0.94, {6,7} 1.0 + 0.6 = 1.60.
    # Experts 0 (score .95) and 4 (.92) are out with their groups: 2 (.88) and 7 (.5 + .6).
    # Token 1, groups: {6,7} 1.64 + 0.6, {2,3} 1.46, {4,5} 1.15, {0,1} 1.0: experts 7 then 6.
    assert [sorted(r) for r in out.topk_idx_TK.tolist()] == [[2, 7], [6, 7]]
    for t, chosen in enumerate(out.topk_idx_TK.tolist()):
        want = s[t, chosen] / s[t, chosen].sum() * 2.5
        assert out.topk_weight_TK[t].tolist() == pytest.approx(want.tolist(), rel=1e-6)
    p = s / s.sum(-1, keepdim=True)  # the aux loss's P: each token's scores normalised
    assert out.mean_prob_E.tolist() == pytest.approx(p.mean(0).tolist(), rel=1e-6)


def test_top1_renormalised_weights_are_one():
    """moe.renormalize at top_k 1 (Mixtral at k = 1): the weight is exactly 1."""
    router, x = _router_with_logits(LOGITS, top_k=1, renormalize=True)
    assert router(x).topk_weight_TK.flatten().tolist() == [1.0, 1.0, 1.0]
