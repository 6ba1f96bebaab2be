"""Router: top-k choices, weights and both auxiliary losses on hand-computed examples."""

import math

import pytest
import torch

from model.moe.router import TopKRouter


def _router_with_logits(logits_TE: torch.Tensor, top_k: int, renormalize: bool) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose logits equal `logits_TE` exactly: x = identity rows, weight = logits^T."""
    T, E = logits_TE.shape
    router = TopKRouter(dim=T, num_experts=E, top_k=top_k, renormalize=renormalize)
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
