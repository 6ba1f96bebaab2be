"""moe.backend = deepspeed: token dropping by hand, the capacity settings reaching DeepSpeed,
and checkpoints that cross backends.

(That the dropless deepspeed backend equals the native one step for step at ep 1, 2, 4 is
in test_layouts.py.)
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig, MoEConfig
from model.moe import build_moe
from model.transformer import TransformerLM
from checkpoint.load import load_checkpoint
from checkpoint.reader import open_checkpoint
from checkpoint.save import save_checkpoint
from parallel.collectives import ProcessGroupExpertComm
from parallel.expert_parallel import apply_expert_parallel
from parallel.topology import Layout, Topology
from tests.distributed.spawn import run_distributed
from trainer.config import TrainConfig
from trainer.optim import PlainStepper

D, E, T = 16, 4, 16  # tokens per rank: capacity = ceil(T / E * top_k * 1.0) = 8 per expert


def _kept_by_hand(idx_TK: torch.Tensor, capacity: int) -> torch.Tensor:
    """DeepSpeed's top-2 capacity rule: per expert, first choices in token order, then second
    choices in token order, fill `capacity` places; the rest are dropped."""
    kept = torch.zeros_like(idx_TK, dtype=torch.bool)
    for e in range(E):
        first = (idx_TK[:, 0] == e).nonzero().flatten().tolist()
        second = (idx_TK[:, 1] == e).nonzero().flatten().tolist()
        for place, t in enumerate(first):
            kept[t, 0] = place < capacity
        for place, t in enumerate(second):
            kept[t, 1] = len(first) + place < capacity
    return kept


def _dropping(rank, world):
    topo = Topology.create(Layout(world_size=world, dp=world, ep=world))
    cfg = MoEConfig(backend="deepspeed", num_experts=E, top_k=2, expert_hidden=24,
                    capacity_factor=1.0, min_capacity=0, drop_tokens=True, use_rts=False)
    torch.manual_seed(0)
    layer = build_moe(D, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    u = F.normalize(torch.ones(D), dim=0)
    with torch.no_grad():  # experts 0 then 1 are everyone's favourites: expert 0 overflows
        layer.router.weight[0] += 3 * u
        layer.router.weight[1] += 2.5 * u
    full = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
    layer.experts.shard_(rank, world)
    layer.set_expert_parallel(ProcessGroupExpertComm(topo.groups["ep"]))

    torch.manual_seed(10 + rank)
    x = torch.randn(1, T, D) + 2 * u
    y, route = layer(x)

    probs = F.softmax(x[0] @ layer.router.weight.detach().T, dim=-1)
    p_TK, idx_TK = probs.topk(2, dim=-1)
    kept = _kept_by_hand(idx_TK, capacity=8)
    assert int(route.dropped_slots) == int((~kept).sum()) > 0
    want = torch.zeros(T, D)
    for t in range(T):
        norm = (p_TK[t] * kept[t]).sum()
        for k in range(2):
            if kept[t, k]:
                e = idx_TK[t, k]
                h = F.silu(x[0, t] @ full["w1_EDF"][e]) * (x[0, t] @ full["w3_EDF"][e])
                want[t] += p_TK[t, k] / norm * (h @ full["w2_EFD"][e])
    torch.testing.assert_close(y[0].detach(), want, rtol=1e-4, atol=1e-5)
    fully_dropped = ~kept.any(dim=1)
    assert fully_dropped.any() and (y[0, fully_dropped] == 0).all()
    return int(route.dropped_slots), int(fully_dropped.sum())


@pytest.mark.distributed
def test_dropped_slots_match_a_hand_count_and_dropped_tokens_output_zero():
    """capacity_factor 1.0, drop_tokens, ep 2: the dropped slots and the output equal a hand
    computation of DeepSpeed's rule; a fully dropped token gets exactly 0 from the layer, so
    the block passes it on through the residual path alone."""
    results = run_distributed(_dropping, world_size=2, timeout_s=120)
    assert all(dropped > 0 and full > 0 for dropped, full in results)


CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=16)


def _moe(backend):
    extra = dict(backend="deepspeed", drop_tokens=False, use_rts=False) if backend == "deepspeed" else {}
    return MoEConfig(num_experts=E, top_k=2, expert_hidden=16, aux_loss_coef=0.0, **extra)


def _loss(model, tokens):
    with torch.no_grad():
        return model(tokens[:, :-1], tokens[:, 1:]).loss.item()


def _cross(rank, world, path, src, dst):
    topo = Topology.create(Layout(world_size=world, dp=world, ep=world))
    torch.manual_seed(0)
    source = TransformerLM(CFG, _moe(src))
    apply_expert_parallel(source, topo)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))
    meta = {"step": 0, "layout": vars(topo.layout)}
    saved = save_checkpoint(Path(path), 0, source, PlainStepper(source, topo, TrainConfig()), topo, meta)
    torch.manual_seed(123)  # different initial weights: everything must come from the file
    target = TransformerLM(CFG, _moe(dst))
    apply_expert_parallel(target, topo)
    load_checkpoint(open_checkpoint(saved), target, PlainStepper(target, topo, TrainConfig()), topo)
    torch.testing.assert_close(_loss(target, tokens), _loss(source, tokens), rtol=1e-5, atol=1e-6)
    return _loss(target, tokens)


@pytest.mark.distributed
@pytest.mark.parametrize("src, dst", [("native", "deepspeed"), ("deepspeed", "native")])
def test_checkpoint_moves_between_backends(tmp_path, src, dst):
    """Saved at ep 2 by one backend, loaded at ep 2 by the other: the same loss on the same
    batch (load-balancing loss off: DeepSpeed's top-2 form differs by design)."""
    run_distributed(_cross, world_size=2, args=(str(tmp_path / "checkpoints"), src, dst), timeout_s=120)


# One process: with drop_tokens each rank applies the capacity rule to its own tokens alone.
# 13 tokens, 4 experts, top 2: tokens / E * top_k = 6.5, not whole, so rounding shows.
CAPACITY_T = 13
CAPACITY_CASES = [  # (train?, capacity_factor, eval_capacity_factor, min_capacity), the
    # capacity DeepSpeed must use, and the capacities that a dropped or mis-rounded setting
    # would give instead (DeepSpeed's own defaults: factors 1.0, min_capacity 8)
    ((True, 1.0, 1.0, 0), 7, {"rounded down": 6, "min_capacity not passed": 8}),
    ((True, 1.0, 1.0, 10), 10, {"min_capacity not passed": 8}),
    ((True, 0.5, 1.0, 0), 4, {"rounded down": 3, "capacity_factor not passed": 7}),
    ((False, 0.5, 1.5, 0), 10, {"rounded down": 9, "eval_capacity_factor not passed": 7,
                                 "capacity_factor used in eval": 4}),
]


@pytest.mark.parametrize("setting, capacity, wrong", CAPACITY_CASES,
                         ids=["ceil", "min_capacity", "capacity_factor", "eval_capacity_factor"])
def test_capacity_settings_reach_deepspeed(setting, capacity, wrong):
    """Dropped slots equal a hand count at capacity max(ceil(T / E * top_k * factor),
    min_capacity), with the training or the eval factor; the routing is skewed so that every
    wrong capacity listed would drop a different number."""
    training, factor, eval_factor, min_capacity = setting
    cfg = MoEConfig(backend="deepspeed", num_experts=E, top_k=2, expert_hidden=8,
                    capacity_factor=factor, eval_capacity_factor=eval_factor,
                    min_capacity=min_capacity, drop_tokens=True, use_rts=False)
    torch.manual_seed(0)
    layer = build_moe(D, cfg).train(training)
    u = F.normalize(torch.ones(D), dim=0)
    with torch.no_grad():  # experts 0 then 1 are most tokens' first and second choices
        torch.nn.init.normal_(layer.router.weight, std=0.3)
        layer.router.weight[0] += 3 * u
        layer.router.weight[1] += 2.5 * u
    x = torch.randn(1, CAPACITY_T, D) + 2 * u
    _, route = layer(x)
    idx_TK = (x[0] @ layer.router.weight.detach().T).topk(2, dim=-1).indices

    def dropped(c: int) -> int:
        return int((~_kept_by_hand(idx_TK, c)).sum())

    got = int(route.dropped_slots)
    assert got == dropped(capacity), (f"DeepSpeed dropped {got} slots; at capacity {capacity} a hand "
                                      f"count drops {dropped(capacity)}")
    for why, c in wrong.items():
        assert dropped(c) != dropped(capacity), f"{why}: this routing cannot tell {c} from {capacity}"
