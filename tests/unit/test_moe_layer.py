"""The MoE layer on one process: equivalences with dense math and between expert impls."""

import copy

import pytest
import torch

from model.config import MoEConfig
from model.layers import SwiGLU
from model.moe import NativeMoE, build_moe
from model.moe.dispatch import LocalComm, combine, dispatch
from model.moe.experts import SwiGLUExperts
from tests.tolerance import close

D, F = 16, 24


def _layer(num_experts=4, top_k=2, impl="grouped_mm", seed=0) -> NativeMoE:
    torch.manual_seed(seed)
    layer = NativeMoE(D, MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=F, expert_impl=impl))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_one_expert_top1_equals_dense_swiglu(impl):
    layer = _layer(num_experts=1, top_k=1, impl=impl)
    dense = SwiGLU(D, F)
    with torch.no_grad():  # nn.Linear stores (out, in); the experts store (in, out)
        dense.w1.weight.copy_(layer.experts.w1_EDF[0].T)
        dense.w3.weight.copy_(layer.experts.w3_EDF[0].T)
        dense.w2.weight.copy_(layer.experts.w2_EFD[0].T)
    x = torch.randn(3, 5, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe, _ = layer(x1)
    y_dense = dense(x2)
    torch.testing.assert_close(y_moe, y_dense)
    g = torch.randn_like(y_dense)
    y_moe.backward(g)
    y_dense.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.experts.w1_EDF.grad[0], dense.w1.weight.grad.T)
    torch.testing.assert_close(layer.experts.w3_EDF.grad[0], dense.w3.weight.grad.T)
    torch.testing.assert_close(layer.experts.w2_EFD.grad[0], dense.w2.weight.grad.T)
    assert layer.router.weight.grad.abs().sum() == 0  # one expert: weight is 1 whatever the logits


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_shared_expert_adds_a_dense_swiglu_to_the_routed_output(backend):
    """moe.shared_expert_hidden: y = routed(x) + SwiGLU_shared(x). The layer equals the same
    layer without a shared expert plus a dense SwiGLU holding the shared weights: output,
    routing, the input's gradient and every parameter's."""
    cfg = dict(num_experts=4, top_k=2, expert_hidden=F, backend=backend)
    if backend == "deepspeed":
        cfg |= dict(drop_tokens=False, use_rts=False)  # dropless, deterministic
    torch.manual_seed(0)
    layer = build_moe(D, MoEConfig(**cfg, shared_expert_hidden=20))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    routed = build_moe(D, MoEConfig(**cfg))
    missing, unexpected = routed.load_state_dict(layer.state_dict(), strict=False)
    assert missing == [] and unexpected == ["shared.w1.weight", "shared.w3.weight", "shared.w2.weight"]
    dense = SwiGLU(D, 20)
    dense.load_state_dict(layer.shared.state_dict())

    x = torch.randn(3, 5, D)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    y, route = layer(xs[0])
    y_routed, route_routed = routed(xs[1])
    y_dense = dense(xs[2])
    torch.testing.assert_close(y, y_routed + y_dense)
    assert torch.equal(route.topk_idx_TK, route_routed.topk_idx_TK)
    g = torch.randn_like(y)
    for out in (y, y_routed, y_dense):
        out.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad + xs[2].grad)
    want = {**{n: p.grad for n, p in routed.named_parameters()},
            **{f"shared.{n}": p.grad for n, p in dense.named_parameters()}}
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert grads.keys() == want.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[name], msg=name)


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_gated_shared_expert_is_scaled_by_a_per_token_sigmoid(backend):
    """moe.shared_expert_gate (Qwen2-MoE): y = routed(x) + sigmoid(x . g) * shared(x), the
    same layer without the gate computed by hand; output and every gradient."""
    cfg = dict(num_experts=4, top_k=2, expert_hidden=F, backend=backend, shared_expert_hidden=20)
    if backend == "deepspeed":
        cfg |= dict(drop_tokens=False, use_rts=False)
    torch.manual_seed(0)
    gated = build_moe(D, MoEConfig(**cfg, shared_expert_gate=True))
    for p in gated.parameters():
        torch.nn.init.normal_(p, std=0.3)
    plain = build_moe(D, MoEConfig(**cfg))
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "shared_gate.weight"})
    gate = gated.shared_gate.weight.detach().clone().requires_grad_()
    x = torch.randn(3, 5, D)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, _ = gated(xs[0])
    routed, _ = plain.routed(xs[1])
    want = routed + torch.sigmoid(xs[1] @ gate.T) * plain.shared(xs[1])
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(gated.shared_gate.weight.grad, gate.grad)
    for (name, p), q in zip(plain.named_parameters(), [p for n, p in gated.named_parameters()
                                                       if n != "shared_gate.weight"]):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def _assert_same_layer(a, b, x, grad=None) -> None:
    """a and b give the same output, input gradient and parameter gradients on x (fp32, up to
    summation order); grad None backpropagates from `.sum()`, a broadcast (zero-stride) one."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, _ = a(xa)
    yb, _ = b(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    for y in (ya, yb):
        (y if grad is not None else y.sum()).backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_grouped_mm_equals_loop_reference():
    a = _layer(num_experts=6, top_k=3, impl="grouped_mm")
    b = copy.deepcopy(a)
    b.experts.impl = "loop"
    # a broadcast (zero-stride) gradient must work with grouped_mm
    _assert_same_layer(a, b, torch.randn(4, 7, D))


def test_moe_equals_per_token_weighted_sum_of_experts():
    """The definition: y_t = sum_k w_tk * expert_{idx_tk}(x_t), computed token by token."""
    layer = _layer(num_experts=4, top_k=2)
    x = torch.randn(10, D)
    y, route = layer(x.view(1, 10, D))
    ex = layer.experts
    for t in range(10):
        want = torch.zeros(D)
        for k in range(2):
            e = route.topk_idx_TK[t, k]
            h = torch.nn.functional.silu(x[t] @ ex.w1_EDF[e]) * (x[t] @ ex.w3_EDF[e])
            want += route.topk_weight_TK[t, k] * (h @ ex.w2_EFD[e])
        torch.testing.assert_close(y[0, t], want, rtol=1e-5, atol=1e-5)


def test_dispatch_then_combine_with_identity_experts_returns_input():
    x = torch.randn(9, D)
    idx = torch.randint(0, 5, (9, 3))
    w = torch.full((9, 3), 1 / 3)
    grouped, plan = dispatch(x, idx, 5, LocalComm())
    assert plan.tokens_per_expert.tolist() == torch.bincount(idx.flatten(), minlength=5).tolist()
    torch.testing.assert_close(combine(grouped, w, plan, LocalComm()), x)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_combine_weighting_equals_autograd_of_the_plain_weighted_sum(dtype, tol):
    """The combine's weighted sum and its two gradients against autograd of sum_k w_k * y_k in
    float64. bf16 rows: within 1e-2 of the largest value (one rounding of the output, and of the
    weights in the row gradient); the weights and their gradient stay fp32."""
    torch.manual_seed(3)
    T, K = 11, 3
    y, w = torch.randn(T * K, D), torch.rand(T, K)
    g = torch.randn(T, D)
    y64, w64 = y.double().requires_grad_(), w.double().requires_grad_()
    (w64.unsqueeze(-1) * y64.view(T, K, D)).sum(1).backward(g.double())
    plan = dispatch(torch.zeros(T, D), torch.zeros(T, K, dtype=torch.long), 1, LocalComm())[1]
    yi, wi = y.to(dtype).requires_grad_(), w.clone().requires_grad_()
    out = combine(yi, wi, plan, LocalComm())
    out.backward(g.to(dtype))
    assert out.dtype == dtype and wi.grad.dtype == torch.float32
    for got, want in ((out, (w64.unsqueeze(-1) * y64.view(T, K, D)).sum(1)), (yi.grad, y64.grad),
                      (wi.grad, w64.grad)):
        assert (got.double() - want).abs().max() <= tol * want.abs().max()
    # A broadcast (zero-stride) gradient, as from `.sum()`, works too.
    combine(yi, wi, plan, LocalComm()).sum().backward()


def test_compiled_kernels_equal_eager():
    """compile_kernels (train.compile): the combine, the dispatch backward and SwiGLU through
    torch.compile (Inductor's CPU code here, Triton on CUDA) give the eager layer's output and
    gradients in fp32, up to summation order; a broadcast gradient works too."""
    for num_experts, top_k in ((6, 3), (8, 1)):
        eager = _layer(num_experts=num_experts, top_k=top_k)
        fused = copy.deepcopy(eager)
        fused.compile_kernels()
        x = torch.randn(3, 9, D)
        _assert_same_layer(fused, eager, x, torch.randn(3, 9, D))
        fused(x)[0].sum().backward()


def test_experts_with_no_tokens_still_get_zero_gradients():
    layer = _layer(num_experts=4, top_k=1)
    with torch.no_grad():  # every token to expert 2
        layer.router.weight.zero_()
        layer.router.weight[2] = 5.0
    x = torch.ones(1, 6, D)
    y, route = layer(x)
    assert route.counts_E.tolist() == [0, 0, 6, 0]
    y.square().sum().backward()
    g = layer.experts.w1_EDF.grad
    assert g is not None and g[[0, 1, 3]].abs().sum() == 0 and g[2].abs().sum() > 0


def test_shard_keeps_a_contiguous_slice_and_rejects_bad_sizes():
    ex = SwiGLUExperts(8, D, F)
    torch.nn.init.normal_(ex.w1_EDF)
    full = ex.w1_EDF.detach().clone()
    ex.shard_(rank=2, size=4)
    assert ex.num_local_experts == 2 and ex.expert_offset == 4
    torch.testing.assert_close(ex.w1_EDF.detach(), full[4:6])
    with pytest.raises(ValueError, match=r"moe.num_experts \(6\) must be divisible by parallel.ep \(4\)"):
        SwiGLUExperts(6, D, F).shard_(0, 4)
    # A second shard_ would slice the slice (empty experts on rank >= 1): refused.
    with pytest.raises(RuntimeError, match=r"sharded already \(2 of 8 from expert 4\)"):
        ex.shard_(rank=1, size=4)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_autocast_bf16_is_close_to_fp32_with_fp32_gradients(impl):
    """Under CPU autocast the experts get bf16 rows (cast once, before dispatch) and compute in
    bf16; the fp32 weights get fp32 gradients. Tolerance: 3e-2 of the largest value (bf16)."""
    ref = _layer(num_experts=4, top_k=2, impl=impl)
    with torch.no_grad():  # shrink the weights so bf16 rounding, not routing, dominates
        for p in ref.experts.parameters():
            p.mul_(0.3)
    layer = copy.deepcopy(ref)
    seen = []
    layer.experts.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    x = torch.randn(4, 32, D)
    x_ref, x_bf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, _ = ref(x_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf, _ = layer(x_bf)
    assert seen == [torch.bfloat16] and y_bf.dtype == torch.bfloat16
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_bf.backward(g)

    close(y_bf, y_ref, rel=3e-2)
    close(x_bf.grad, x_ref.grad, rel=3e-2, what="input grad")
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32, name
        close(p.grad, q.grad, rel=3e-2, what=name)
