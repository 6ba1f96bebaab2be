"""The deepspeed backend on CUDA in bf16 against the native one, on the same weights and tokens.

Skipped without CUDA (or without DeepSpeed). A world of one on NCCL, as the trainer makes on one
GPU. Dropless and deterministic (drop_tokens false, no random token selection, no second-expert
sampling), so both backends route the same tokens to the same experts with the same fp32
weights; only the expert math differs (DeepSpeed's capacity buffer through batched matmuls,
ours through grouped_mm) and the combine's rounding. bf16 tolerance as in
tests/megablocks_checks.py: 2e-2 of the reference's largest magnitude for outputs and input
gradients, 3e-2 for weight gradients. DeepSpeed's load-balancing loss is its own (for top-2 it
counts first choices only), so the loss here is built from the output and the z-loss alone.
"""

import importlib.util

import pytest
import torch

from model.config import MoEConfig
from model.moe import build_moe
from tests.tolerance import BF16, close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed"),
]


@pytest.fixture(scope="module")
def nccl_world_of_one():
    from launcher.env import DistEnv, init_distributed, shutdown_distributed

    init_distributed(DistEnv(0, 0, 1, 1, "127.0.0.1", 29511, "single"), "nccl", 120)
    yield
    shutdown_distributed()


@pytest.mark.parametrize("num_experts, top_k, tokens", [(8, 2, 2048), (64, 8, 1024), (16, 1, 512)])
def test_dropless_deepspeed_equals_native_bf16(nccl_world_of_one, num_experts, top_k, tokens):
    dim, hidden = 256, 128
    base = dict(num_experts=num_experts, top_k=top_k, expert_hidden=hidden)
    torch.manual_seed(0)
    native = build_moe(dim, MoEConfig(**base))
    for p in native.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ds = build_moe(dim, MoEConfig(**base, backend="deepspeed", drop_tokens=False, use_rts=False,
                                  second_expert_sampling=False))
    assert ds.state_dict().keys() == native.state_dict().keys()
    ds.load_state_dict(native.state_dict())
    native, ds = native.cuda().to(BF16), ds.cuda().to(BF16)

    x = torch.randn(2, tokens // 2, dim, device="cuda").to(BF16)
    x_n, x_d = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_n, route_n = native(x_n)
    y_d, route_d = ds(x_d)
    assert y_d.dtype == y_n.dtype == BF16 and y_d.shape == y_n.shape
    assert torch.equal(route_d.topk_idx_TK, route_n.topk_idx_TK)
    assert int(route_d.dropped_slots) == 0
    close(y_d, y_n)

    def loss(y, route):
        return y.float().square().mean() + 0.001 * route.z_loss

    loss_n, loss_d = loss(y_n, route_n), loss(y_d, route_d)
    close(loss_d, loss_n, what="loss")
    loss_n.backward()
    loss_d.backward()
    close(x_d.grad, x_n.grad, what="input grad")
    close(ds.router.weight.grad, native.router.weight.grad, rel=3e-2, what="router.weight grad")
    for name, p_n in native.experts.named_parameters():
        p_d = getattr(ds.experts, name)
        assert p_d.grad.dtype == BF16
        close(p_d.grad, p_n.grad, rel=3e-2, what=f"experts.{name} grad")
