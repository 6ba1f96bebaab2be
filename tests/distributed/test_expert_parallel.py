"""Expert parallelism equals ep=1 for one MoE layer (whole-model layouts: test_layouts.py).

The reference always runs inside the same process on the unsharded model (LocalComm), so the
comparison is exact up to fp32 summation order. Tolerances: rtol 1e-4, atol 1e-5 (fp32).
The ep layer's forward also makes exactly one host synchronisation (the split sizes), counted
by benchmarks.host_syncs.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from benchmarks.host_syncs import HostSyncCounter
from model.config import MoEConfig
from model.moe import NativeMoE
from parallel.collectives import ProcessGroupExpertComm
from parallel.topology import Layout, Topology
from tests.distributed.spawn import run_distributed

TOL = dict(rtol=1e-4, atol=1e-5)
D, E = 16, 8


def _layer_equivalence(rank, world, ep, top_k, hot_expert):
    topo = Topology.create(Layout(world_size=world, dp=world, ep=ep))
    torch.manual_seed(0)
    ref = NativeMoE(D, MoEConfig(num_experts=E, top_k=top_k, expert_hidden=24))
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if hot_expert is not None:  # every token of every rank picks the same expert first
        with torch.no_grad():
            ref.router.weight.zero_()
            ref.router.weight[hot_expert] = 3.0
    layer = copy.deepcopy(ref)
    layer.experts.shard_(topo.coord("ep"), ep)
    if ep > 1:
        layer.set_expert_parallel(ProcessGroupExpertComm(topo.groups["ep"]))

    torch.manual_seed(100 + rank)  # different tokens on every rank
    x = torch.randn(3, 5, D).abs() if hot_expert is not None else torch.randn(3, 5, D)
    g = torch.randn(3, 5, D)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, _ = ref(x_ref)
    with HostSyncCounter() as syncs:
        y_ep, route = layer(x_ep)
    assert dict(syncs.ops) == ({"tolist": 1} if ep > 1 else {}), dict(syncs.ops)
    torch.testing.assert_close(y_ep, y_ref, **TOL)
    y_ref.backward(g)
    y_ep.backward(g)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad, **TOL)
    # An expert's gradient on its owner holds the contributions of the whole ep group's tokens.
    lo, n = layer.experts.expert_offset, layer.experts.num_local_experts
    for name, p in layer.experts.named_parameters():
        want = getattr(ref.experts, name).grad.clone()
        if ep > 1:
            dist.all_reduce(want, group=topo.groups["ep"])
        assert p.grad is not None, f"{name} has no gradient on rank {rank}"
        torch.testing.assert_close(p.grad, want[lo : lo + n], **TOL, msg=name)
    return route.counts_E.tolist()


@pytest.mark.distributed
@pytest.mark.parametrize("ep", [2, 4])
def test_moe_layer_ep_equals_ep1(ep):
    run_distributed(_layer_equivalence, world_size=4, args=(ep, 2, None), timeout_s=120)


@pytest.mark.distributed
def test_all_tokens_on_one_expert_with_ep4():
    # Expert 5 lives on rank 2: ranks 0, 1, 3 receive nothing, rank 2 receives everything.
    counts = run_distributed(_layer_equivalence, world_size=4, args=(4, 1, 5), timeout_s=120)
    assert all(c == [0, 0, 0, 0, 0, 15, 0, 0] for c in counts)


