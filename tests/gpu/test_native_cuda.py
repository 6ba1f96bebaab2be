"""The native MoE layer on CUDA: grouped_mm in bf16 against the fp32 loop reference, with the
elementwise work around the GEMMs eager and fused by torch.compile (train.compile).

Skipped without CUDA. bf16 tolerance: outputs and gradients within 2e-2 relative to the
tensor's largest value (bf16 has 8 bits of mantissa; the reference is fp32 on the same GPU).
"""

import copy

import pytest
import torch

from model.config import MoEConfig
from model.moe import NativeMoE
from tests.tolerance import close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (64, 8)])
def test_grouped_mm_bf16_matches_fp32_loop(num_experts, top_k, fused):
    """fused: the elementwise work through torch.compile (Triton), as train.compile runs it."""
    torch.manual_seed(0)
    ref = NativeMoE(256, MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=128,
                                  expert_impl="loop")).cuda()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fast = copy.deepcopy(ref).to(torch.bfloat16)
    fast.experts.impl = "grouped_mm"
    if fused:
        fast.compile_kernels()
    # The reference holds the bf16-rounded values in fp32: both route identically (the router
    # computes in fp32 either way), so only the expert math differs.
    ref.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    x = torch.randn(4, 512, 256, device="cuda").to(torch.bfloat16)
    x_ref, x_fast = x.float().requires_grad_(), x.clone().requires_grad_()
    y_ref, _ = ref(x_ref)
    y_fast, _ = fast(x_fast)
    close(y_fast, y_ref)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_fast.backward(g.to(torch.bfloat16))
    close(x_fast.grad, x_ref.grad)
    for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
        close(p_fast.grad, p_ref.grad, rel=3e-2, what=f"grad of {name}")


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (64, 8)])
def test_forward_and_backward_make_no_host_sync_at_ep1(num_experts, top_k, fused):
    """The real count behind benchmarks.host_syncs' CPU proxy: with CUDA's sync debug mode set
    to "error", any host synchronisation in the layer's forward or backward raises. The mode is
    shown to be on (a host sync inside it raises), and the checked pass is shown to be the real
    one: its output and gradients equal the warm-up pass's (bf16 tolerance, as above)."""
    torch.manual_seed(0)
    layer = NativeMoE(256, MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=128))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    layer = layer.cuda().to(torch.bfloat16)
    if fused:
        layer.compile_kernels()
    x = torch.randn(4, 512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    y_warm, _ = layer(x)  # warm-up: first-call allocations and kernel loads
    y_warm.backward(g)
    want = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    x.grad = None
    layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="called a synchronizing CUDA operation"):
            x.sum().item()
        y, _ = layer(x)
        y.backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    close(y, y_warm.detach())
    got = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    for name, grad in want.items():
        assert got[name] is not None, f"no gradient for {name}"
        close(got[name], grad, rel=3e-2, what=f"grad of {name}")
