"""Whole models at one process: ours, loaded through a family's name table, equals transformers'
on the same weights, from both expert layouts: logits, loss (cross-entropy plus transformers'
pooled load-balancing loss), every parameter's gradient, and greedy decoding with our KV
cache equals transformers' `generate` token for token.

fp32 tolerance: every compared tensor's largest error within 2e-5 of its largest magnitude
(measured: 4e-6 at most, from summation order and the relabelled rotary features)."""

import pytest
import torch

from checkpoint.hf import ours_to_hf
from model.kv_cache import greedy_generate
from tests.tolerance import close
from tests.unit.hf_tiny import ours_from, per_expert_state, tiny_hf

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
REL = 2e-5


@pytest.fixture(scope="module", params=FAMILIES)
def hf_model(request):
    return tiny_hf(request.param)


def _state(hf_model, layout, tmp_path):
    return hf_model.state_dict() if layout == "fused" else per_expert_state(hf_model, tmp_path)


def hf_grads(ours, family, model_cfg, moe_cfg) -> dict[str, torch.Tensor]:
    """Our gradients under transformers' (fused, in-memory) names; buffers as they are."""
    state = ours.state_dict()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ours.named_parameters()}
    return ours_to_hf(family, state | grads, model_cfg, moe_cfg, "fused")


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_logits_loss_and_gradients_equal_transformers(hf_model, layout, tmp_path):
    ours, family, model_cfg, moe_cfg = ours_from(hf_model, _state(hf_model, layout, tmp_path))
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    hf_model.zero_grad()
    want = hf_model(input_ids=x, labels=y, shift_labels=y, output_router_logits=True)
    got = ours(x, y)
    close(got.logits, want.logits, REL, "logits")
    close(got.aux_loss, want.aux_loss, REL, "load-balancing loss")
    close(got.loss, want.loss, REL, "loss")
    want.loss.backward()
    got.loss.backward()
    grads = hf_grads(ours, family, model_cfg, moe_cfg)
    for name, p in hf_model.named_parameters():
        close(grads[name], p.grad, REL, f"gradient of {name}")


def test_greedy_decoding_with_the_kv_cache_equals_transformers_generate(hf_model):
    ours, *_ = ours_from(hf_model, hf_model.state_dict())
    prompt = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    want = hf_model.generate(prompt, max_new_tokens=32, do_sample=False)
    got = greedy_generate(ours, prompt, 32)
    assert got.shape == want.shape == (2, 40)
    assert torch.equal(got, want), (got, want)
