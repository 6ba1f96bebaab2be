"""Save under one layout, load under another: the state and the next loss are the same.

One 4-rank run saves checkpoints after 2 optimizer steps at several layouts, and records the
losses of the step each would take next. Each case then loads one of them in new processes
under another layout and (a) saves again straight away: every tensor of the two checkpoints
(parameters, Adam's moments; experts by global id) must be bitwise equal, since loading and
saving only move values; (b) takes the next step: its losses must match the saving layout's
(rtol 1e-5: fp32 reductions run in another order and grouping). The global batch is the same
8 sequences per step at every layout (dp x micro_batch_size = 8).

The cases of one world size run one after another in one set of processes (process start-up
dominates on 2 cores); each case reports on its own.
"""

from __future__ import annotations

import pytest
import torch

from checkpoint.reader import open_checkpoint, resolve
from tests.distributed.ckpt_setup import make_trainer, step_losses, world_of
from tests.distributed.spawn import case_result, run_cases, run_distributed

SAVED = ("dp4_ep4", "dp4_ep2", "dp4_ep2_zero2", "dp2_tp2_ep2", "dp2_tp2_ep2_zero2", "dp4_ep4_bias",
         "dp2_tp2_ep2_bias")
CASES = [
    ("dp4_ep4", "dp4_ep2"),  # ep 4 -> 2
    ("dp4_ep2", "dp4_ep4"),  # ep 2 -> 4
    ("dp4_ep4", "dp4_ep1"),  # ep 4 -> 1
    ("dp4_ep2_zero2", "dp2_ep2_zero1"),  # dp 4 with ZeRO-2 -> dp 2 with ZeRO-1 (4 -> 2 processes)
    ("dp2_tp2_ep2", "dp4_ep4"),  # tp 2 x ep 2 -> tp 1 x ep 4
    ("dp2_tp2_ep2_zero2", "dp4_ep4_zero1"),  # the same with ZeRO on both sides
    ("dp4_ep4", "dp2_tp2_ep2"),  # tp 1 -> tp 2: attention and dense FFNs split on load
    ("dp4_ep2_zero2", "dp2_tp2_ep2_zero2"),  # the same into DeepSpeed's partitions
    ("dp4_ep4", "dp4_ep2_deepspeed"),  # native -> deepspeed backend
    ("dp4_ep4_bias", "dp2_tp2_ep2_bias"),  # the routers' expert bias (a buffer) goes along
    ("dp4_ep4_bias", "dp2_tp2_ep2_zero2_bias"),  # ... into a DeepSpeed ZeRO-2 run
]


def _save_all(rank, world, root):
    next_losses = {}
    for layout in SAVED:
        trainer = make_trainer(rank, f"{root}/{layout}", layout)
        for _ in range(2):
            step_losses(trainer)
        if layout.endswith("_bias"):  # every rank holds the same bias (it is written once)
            bias = torch.stack([m.router.expert_bias for m in trainer.model.moe_layers()])
            every = [torch.empty_like(bias) for _ in range(world)]
            torch.distributed.all_gather(every, bias)
            assert all(torch.equal(b, bias) for b in every), every
        trainer.save()
        next_losses[layout] = step_losses(trainer)
    return next_losses


def _load(rank, world, root, src, dst):
    ckpt, _ = resolve(f"{root}/{src}/checkpoints", root)
    trainer = make_trainer(rank, f"{root}/{src}-to-{dst}", dst)
    trainer.resume(ckpt)
    return str(trainer.save()), step_losses(trainer)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    losses = run_distributed(_save_all, 4, (str(root),), timeout_s=300)[0]
    loaded = {}
    for world in sorted({world_of(dst) for _, dst in CASES}):
        cases = [(str(root), *c) for c in CASES if world_of(c[1]) == world]
        loaded |= {c[1:]: r for c, r in run_cases(_load, world, cases, timeout_s=400).items()}
    return root, losses, loaded


def _assert_same_state(a, b):
    names = set(a.tensors)
    assert names == set(b.tensors), names ^ set(b.tensors)
    assert any(n.startswith("optim/") for n in names), "no optimizer state was saved"
    for name in sorted(names):
        x, y = a.full(name), b.full(name)
        if ".experts." in name:  # name the expert whose state moved
            for e in range(x.shape[0]):
                assert torch.equal(x[e], y[e]), f"{name}: expert {e} differs"
        assert torch.equal(x, y), name
    for key in ("step", "samples_seen", "tokens_seen", "adam_step"):
        assert a.meta[key] == b.meta[key], key


@pytest.mark.distributed
@pytest.mark.parametrize("src, dst", CASES, ids=[f"{a}-to-{b}" for a, b in CASES])
def test_load_under_another_layout(results, src, dst):
    root, losses, loaded = results
    resaved, next_loss = case_result(loaded, (src, dst))[0]
    saved, _ = resolve(str(root / src / "checkpoints"), root)
    _assert_same_state(saved, open_checkpoint(resaved))
    assert saved.meta["layout"] != open_checkpoint(resaved).meta["layout"]
    # LM and z losses are token means: any layout gives them. The load-balancing loss is
    # computed per rank on its own tokens (f_e * P_e is not linear in the batch), so it is
    # comparable only where each rank routes the same tokens; DeepSpeed's gate has its own
    # top-2 form of it and no z-loss of ours.
    same_routing = src.split("_")[0] == dst.split("_")[0] and "tp" not in src + dst
    compared = [0] if "deepspeed" in dst else [0, 1, 2] if same_routing else [0, 2]
    torch.testing.assert_close(torch.tensor(next_loss)[compared], torch.tensor(losses[src])[compared],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
@pytest.mark.parametrize("plain, zero", [("dp4_ep2", "dp4_ep2_zero2"), ("dp2_tp2_ep2", "dp2_tp2_ep2_zero2")])
def test_zero_partitions_hold_what_plain_adamw_holds(results, plain, zero):
    """The same 2 steps with and without ZeRO-2: the state read out of DeepSpeed's partitions
    (padding removed, tp partners' duplicates of unsplit parameters skipped) equals plain
    AdamW's, parameter by parameter, dense and expert (atol 1e-6: the reductions differ in
    order). ZeRO-1 is read back in the resaves of the cases above."""
    root, _, _ = results
    a, _ = resolve(str(root / plain / "checkpoints"), root)
    b, _ = resolve(str(root / zero / "checkpoints"), root)
    assert set(a.tensors) == set(b.tensors)
    for name in sorted(a.tensors):
        torch.testing.assert_close(b.full(name), a.full(name), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_expert_bias_moves_the_same_at_every_layout(results):
    """moe.bias_update_rate: after 2 steps on the same global batch, dp 4 x ep 4 and dp 2 x
    tp 2 x ep 2 hold the same routers' bias (the load is counted over dp, where tp partners
    count the same tokens), and it has moved, by 0.01 per step and expert at most."""
    root, _, _ = results
    a, _ = resolve(str(root / "dp4_ep4_bias" / "checkpoints"), root)
    b, _ = resolve(str(root / "dp2_tp2_ep2_bias" / "checkpoints"), root)
    names = sorted(n for n in a.tensors if n.endswith("router.expert_bias"))
    assert len(names) == 2 and names == sorted(n for n in b.tensors if n.endswith("router.expert_bias"))
    for name in names:
        assert torch.equal(a.full(name), b.full(name)), name
        assert 0 < a.full(name).abs().max().item() <= 0.02 + 1e-6, name
