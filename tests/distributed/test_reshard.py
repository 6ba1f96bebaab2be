"""Save under one layout, load under another: the state and the next step are the same.

One 4-rank run saves checkpoints after 2 optimizer steps at several layouts, takes a third
step and saves again. Each case then loads the step-2 checkpoint in new processes under
another layout and (a) saves again straight away: every tensor of the two checkpoints
(parameters, Adam's moments; experts by global id) must be bitwise equal, since loading and
saving only move values; (b) takes the third step: its losses must match the saving layout's
(rtol 1e-5: fp32 reductions run in another order and grouping), and so must every parameter
and moment after it (per expert id, STEP_TOL relative to each tensor's own largest value):
the step reads both of Adam's moments, so a moment put back in the wrong place shows here
even when the writer and the reader agree on the wrong place. The global batch is the same
8 sequences per step at every layout (dp x micro_batch_size = 8).

The cases of one world size run one after another in one set of processes (process start-up
dominates on 2 cores); each case reports on its own.
"""

from __future__ import annotations

import pytest
import torch

from checkpoint.reader import open_checkpoint
from checkpoint.store import step_dir_name
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

# The load-balancing loss is computed per rank on its own tokens, so its gradient (which
# reaches every weight through the routers) depends on the layout by design: off here, so
# that one step at two layouts is the same step.
NO_AUX = ("--moe.aux_loss_coef=0",)


def _save_all(rank, world, root):
    """{layout: (losses of step 3, the step-2 checkpoint, the step-3 checkpoint)}."""
    out = {}
    for layout in SAVED:
        trainer = make_trainer(rank, f"{root}/{layout}", layout, *NO_AUX)
        for _ in range(2):
            step_losses(trainer)
        if layout.endswith("_bias"):  # every rank holds the same bias (it is written once)
            bias = torch.stack([m.router.expert_bias for m in trainer.model.moe_layers()])
            every = [torch.empty_like(bias) for _ in range(world)]
            torch.distributed.all_gather(every, bias)
            assert all(torch.equal(b, bias) for b in every), every
        saved = trainer.save()
        losses = step_losses(trainer)
        out[layout] = (losses, str(saved), str(trainer.save()))
    return out


def _load(rank, world, root, src, dst):
    trainer = make_trainer(rank, f"{root}/{src}-to-{dst}", dst, *NO_AUX)
    trainer.resume(open_checkpoint(f"{root}/{src}/checkpoints/{step_dir_name(2)}"))
    resaved = trainer.save()
    losses = step_losses(trainer)
    return str(resaved), losses, str(trainer.save())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    saved = run_distributed(_save_all, 4, (str(root),), timeout_s=300)[0]
    loaded = {}
    for world in sorted({world_of(dst) for _, dst in CASES}):
        cases = [(str(root), *c) for c in CASES if world_of(c[1]) == world]
        loaded |= {c[1:]: r for c, r in run_cases(_load, world, cases, timeout_s=400).items()}
    return saved, loaded


def _same_names(a, b) -> list[str]:
    names = set(a.tensors)
    assert names == set(b.tensors), names ^ set(b.tensors)
    assert any(n.startswith("optim/") for n in names), "no optimizer state was saved"
    return sorted(names)


def _assert_same_state(a, b):
    for name in _same_names(a, b):
        x, y = a.full(name), b.full(name)
        if ".experts." in name:  # name the expert whose state moved
            for e in range(x.shape[0]):
                assert torch.equal(x[e], y[e]), f"{name}: expert {e} differs"
        assert torch.equal(x, y), name
    for key in ("step", "samples_seen", "tokens_seen", "adam_step"):
        assert a.meta[key] == b.meta[key], key


# After one step at another layout, fp32 reductions in another order leave the moments within
# 1e-5 of their scale and the weights within 5e-5 (an Adam update of a gradient near 0 is the
# most sensitive); a moment in the wrong place moves its weight by ~1e-2. The scale is each
# tensor's (each expert's) own largest value, so that Adam's exp_avg_sq (~1e-10 .. 1e-8 here)
# is compared as tightly as the weights.
STEP_TOL = 2e-4


def _assert_close_state(got, want, tol=STEP_TOL):
    """Every tensor of `got` within `tol` of `want`, relative to its own scale; experts one
    by one, by global id."""
    for name in _same_names(got, want):
        x, y = got.full(name), want.full(name)
        per_expert = ".experts." in name
        for e, (xe, ye) in enumerate(zip(x, y) if per_expert else [(x, y)]):
            what = f"{name}, expert {e}" if per_expert else name
            scale = ye.abs().max().item()
            torch.testing.assert_close(xe, ye, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("src, dst", CASES, ids=[f"{a}-to-{b}" for a, b in CASES])
def test_load_under_another_layout(results, src, dst):
    saved, loaded = results
    losses, step2, step3 = saved[src]
    resaved, next_loss, stepped = case_result(loaded, (src, dst))[0]
    _assert_same_state(open_checkpoint(step2), open_checkpoint(resaved))
    assert open_checkpoint(step2).meta["layout"] != open_checkpoint(resaved).meta["layout"]
    # LM and z losses are token means: any layout gives them. The load-balancing loss is
    # computed per rank on its own tokens (f_e * P_e is not linear in the batch), so it is
    # comparable only where each rank routes the same tokens; DeepSpeed's gate has its own
    # top-2 form of it and no z-loss of ours.
    same_routing = src.split("_")[0] == dst.split("_")[0] and "tp" not in src + dst
    compared = [0] if "deepspeed" in dst else [0, 1, 2] if same_routing else [0, 2]
    torch.testing.assert_close(torch.tensor(next_loss)[compared], torch.tensor(losses)[compared],
                               rtol=1e-5, atol=1e-7)
    # The third step's update used every moment: parameters and moments after it agree.
    _assert_close_state(open_checkpoint(stepped), open_checkpoint(step3))


@pytest.mark.distributed
@pytest.mark.parametrize("plain, zero", [("dp4_ep2", "dp4_ep2_zero2"), ("dp2_tp2_ep2", "dp2_tp2_ep2_zero2")])
def test_zero_partitions_hold_what_plain_adamw_holds(results, plain, zero):
    """The same 2 steps with and without ZeRO-2: the state read out of DeepSpeed's partitions
    (padding removed, tp partners' duplicates of unsplit parameters skipped) equals plain
    AdamW's, parameter by parameter, dense and expert by expert (STEP_TOL of each one's own
    scale: the reductions differ in order). ZeRO-1 is read back in the resaves of the cases
    above."""
    saved, _ = results
    _assert_close_state(open_checkpoint(saved[zero][1]), open_checkpoint(saved[plain][1]))


@pytest.mark.distributed
@pytest.mark.parametrize("a, b", [("dp4_ep4", "dp4_ep2"), ("dp4_ep4", "dp2_tp2_ep2")])
def test_the_same_steps_write_the_same_state_at_every_layout(results, a, b):
    """The files themselves, not only what a reader makes of them: the same 2 steps at two
    layouts write the same parameters and moments, expert by expert (a writer and a reader
    that agree on a wrong place would pass every load of the cases above at an unchanged ep)."""
    saved, _ = results
    _assert_close_state(open_checkpoint(saved[b][1]), open_checkpoint(saved[a][1]))


@pytest.mark.distributed
def test_expert_bias_moves_the_same_at_every_layout(results):
    """moe.bias_update_rate: after 2 steps on the same global batch, dp 4 x ep 4 and dp 2 x
    tp 2 x ep 2 hold the same routers' bias (the load is counted over dp, where tp partners
    count the same tokens), and it has moved, by 0.01 per step and expert at most."""
    saved, _ = results
    a, b = open_checkpoint(saved["dp4_ep4_bias"][1]), open_checkpoint(saved["dp2_tp2_ep2_bias"][1])
    names = sorted(n for n in a.tensors if n.endswith("router.expert_bias"))
    assert len(names) == 2 and names == sorted(n for n in b.tensors if n.endswith("router.expert_bias"))
    for name in names:
        assert torch.equal(a.full(name), b.full(name)), name
        assert 0 < a.full(name).abs().max().item() <= 0.02 + 1e-6, name
