"""What the native MoE layer costs besides FLOPs, checked on CPU: host synchronisations in
forward and the bytes it keeps for backward. Both are exact counts, not timings.

Issue 6's rules: at most one host synchronisation per MoE layer in forward (the split sizes,
only under expert parallelism; the ep>1 count is in tests/distributed/test_expert_parallel.py)
and none in the expert compute; activation memory kept low.
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.host_syncs import HostSyncCounter
from benchmarks.saved_tensors import saved_tensor_bytes
from model.config import MoEConfig
from model.moe import NativeMoE
from model.moe.experts import EAGER, _GroupedSwiGLU, compiled_pointwise

T, D, FF, E, K = 256, 64, 96, 8, 2


def _layer(impl="grouped_mm", dtype=torch.float32, num_experts=E, top_k=K) -> NativeMoE:
    torch.manual_seed(0)
    layer = NativeMoE(D, MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=FF,
                                   expert_impl=impl))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return layer.to(dtype)


def test_counter_sees_the_usual_culprits():
    idx = torch.tensor([3, 1, 1])
    with HostSyncCounter() as c:
        idx.tolist()
        idx[0].item()
        torch.bincount(idx)
        torch.repeat_interleave(idx)
        idx[idx > 1]
        torch.argsort(idx)  # stays on the device
        torch.repeat_interleave(idx, output_size=5)  # size given: stays on the device
    assert dict(c.ops) == {"tolist": 1, "_local_scalar_dense": 1, "bincount": 1,
                           "repeat_interleave": 1, "index": 1}


def test_native_forward_makes_no_host_sync_at_ep1():
    layer = _layer()
    x = torch.randn(1, T, D, requires_grad=True)
    with HostSyncCounter() as c:
        layer(x)
    assert c.count == 0, dict(c.ops)


def test_loop_reference_syncs_once_so_the_count_can_fail():
    layer = _layer(impl="loop")
    with HostSyncCounter() as c:
        layer(torch.randn(1, T, D))
    assert dict(c.ops) == {"tolist": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "autocast"])
@pytest.mark.parametrize("num_experts, top_k", [(E, K), (64, 8)])
def test_saved_activations_stay_within_budget(dtype, num_experts, top_k):
    """Kept for backward, in the activations' dtype (b bytes): the sorted input rows (N, D),
    the two up-projections h1, h3 (N, F) and the un-permuted output rows (N, D), plus the
    router's input (T, D). Small change: two int64 slot permutations (N), the router's fp32
    (T, E) tensors and (T, K) choices. Autograd on the plain expressions also kept silu(h1) and
    h (2 more (N, F)), an fp32 copy of the output rows and an fp32 copy of the router input.
    "autocast": an fp32 layer under bf16 autocast keeps the same activations in bf16, the
    router's input in fp32 (the block's dtype), and no bf16 copies of the expert weights.
    """
    autocast = dtype == "autocast"
    dtype = torch.float32 if autocast else dtype
    layer = _layer(dtype=dtype, num_experts=num_experts, top_k=top_k)
    x = torch.randn(1, T, D, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        saved, _ = saved_tensor_bytes(lambda: layer(x), layer.parameters())
    N, b = T * top_k, 2 if autocast else dtype.itemsize
    big = b * (2 * N * D + 2 * N * FF) + dtype.itemsize * T * D
    small = 8 * 2 * N + 4 * 4 * T * num_experts + 16 * T * top_k
    assert saved <= big + small, f"saved {saved} B > budget {big} + {small} B"
    # ...and the budget binds: one more (N, F) activation would not fit.
    assert saved > big + small - b * N * FF


def _plain(x, w1, w3, w2, offs):
    h = F.silu(F.grouped_mm(x, w1, offs=offs)) * F.grouped_mm(x, w3, offs=offs)
    return F.grouped_mm(h, w2, offs=offs)


@pytest.mark.parametrize("frozen, fused", [((), False), (("w2",), False), (("w1", "w3", "w2"), False),
                                           ((), True), (("w2",), True)])
def test_recomputing_backward_equals_autograd_of_the_plain_expression(frozen, fused):
    """fused: the elementwise math through torch.compile (train.compile), here Inductor's CPU
    code; on CUDA it is Triton. In fp32 both are the same arithmetic up to rounding."""
    pointwise = compiled_pointwise() if fused else EAGER
    torch.manual_seed(1)
    counts = torch.tensor([5, 0, 9, 2])  # an expert with no rows on purpose
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(int(counts.sum()), D)
    ws = {"w1": torch.randn(4, D, FF), "w3": torch.randn(4, D, FF), "w2": torch.randn(4, FF, D)}
    g = torch.randn(x.shape)
    grads = []
    for fn in (_plain, lambda *a: _GroupedSwiGLU.apply(*a, torch.float32, pointwise)):
        xi = x.clone().requires_grad_()
        wi = {k: v.clone().requires_grad_(k not in frozen) for k, v in ws.items()}
        fn(xi, wi["w1"], wi["w3"], wi["w2"], offs).backward(g)
        grads.append([xi.grad] + [wi[k].grad for k in ("w1", "w3", "w2")])
    # A broadcast (zero-stride) gradient, which grouped_mm's own backward rejects, works too.
    _GroupedSwiGLU.apply(x.requires_grad_(), *ws.values(), offs, torch.float32, pointwise).sum().backward()
    for got, want in zip(*grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
