"""zero_stage 3 checkpoints are the format every stage writes: any layout and stage loads them.

One 4-rank run trains 2 steps at each saved layout (launcher.train's model and trainer), saves,
and records the losses of the step it would take next. Each case loads one of them in new
processes under another layout and stage and (a) saves again straight away: every tensor
(parameters, Adam's moments, the routers' expert bias; experts by global id) must be bitwise
equal to the source's, since loading and saving only move values; (b) takes the next step,
whose losses must match the saving run's (rtol 1e-5, as in test_reshard.py). Cases: stage 3 ->
0 and 3 -> 3 at another dp, tp and ep; 1 -> 3 and 2 -> 3 at another dp and ep (DeepSpeed's
flat partitions into FSDP's shards). Also: after the same 2 steps stage 3's checkpoint holds
what stage 0's holds, and a run resumed at stage 3 ends bitwise equal to one never stopped.
"""

from __future__ import annotations

import pytest
import torch

from checkpoint.reader import open_checkpoint, resolve
from tests.distributed.ckpt_setup import make_trainer, resume_and_resave, step_losses, world_of
from tests.distributed.spawn import case_result, run_cases, run_distributed

Z3 = "--parallel.zero_stage=3"
SAVED = [("dp4_ep2", Z3), ("dp2_tp2_ep2_bias", Z3), ("dp4_ep2",), ("dp4_ep4_zero1",),
         ("dp4_ep2_zero2",)]
CASES = [
    (("dp4_ep2", Z3), ("dp4_ep4",)),  # 3 -> 0, ep 2 -> 4
    (("dp2_tp2_ep2_bias", Z3), ("dp4_ep4_bias",)),  # 3 -> 0, tp 2 -> 1, the expert bias along
    (("dp4_ep2", Z3), ("dp4_ep1", Z3)),  # 3 -> 3, ep 2 -> 1 (experts over edp 4)
    (("dp4_ep4_zero1",), ("dp2_ep2", Z3)),  # 1 -> 3, dp 4 -> 2, ep 4 -> 2 (4 -> 2 processes)
    (("dp4_ep2_zero2",), ("dp2_tp2_ep2", Z3)),  # 2 -> 3, tp 1 -> 2
]
RESUME = ("dp4_ep2", Z3, "--train.steps=4", "--checkpoint.interval=2", "--train.eval_interval=2",
          "--logging.log_interval=1")


def _dir(root, layout) -> str:
    return f"{root}/{'+'.join(a.removeprefix('--parallel.') for a in layout)}"


def _save_all(rank, world, root):
    next_losses = {}
    for layout in SAVED:
        trainer = make_trainer(rank, _dir(root, layout), *layout)
        for _ in range(2):
            step_losses(trainer)
        trainer.save()
        next_losses[layout] = step_losses(trainer)
    # Bitwise resume: 4 steps, evaluating and saving at 2 and 4; then 2 -> 4 resumed.
    whole = make_trainer(rank, f"{root}/whole", *RESUME).fit()
    ckpt, _ = resolve(f"{root}/whole/checkpoints/step_00000002", root)
    resumed = make_trainer(rank, f"{root}/resumed", *RESUME)
    resumed.resume(ckpt)
    return next_losses, whole["train"], resumed.fit()["train"]


def _load(rank, world, root, src, dst):
    return resume_and_resave(rank, f"{_dir(root, src)}/checkpoints",
                             _dir(root, src) + "-to-" + _dir("", dst)[1:], *dst)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_reshard")
    saved = run_distributed(_save_all, 4, (str(root),), timeout_s=400)[0]
    loaded = {}
    for world in sorted({world_of(dst[0]) for _, dst in CASES}):
        cases = [(str(root), *c) for c in CASES if world_of(c[1][0]) == world]
        loaded |= {c[1:]: r for c, r in run_cases(_load, world, cases, timeout_s=400).items()}
    return root, saved, loaded


def _tensors(root, layout):
    return resolve(f"{_dir(root, layout)}/checkpoints", root)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("src, dst", CASES, ids=[
    f"{'+'.join(a)}-to-{'+'.join(b)}".replace("--parallel.", "") for a, b in CASES])
def test_stage3_checkpoints_load_under_another_layout_and_stage(results, src, dst):
    root, (next_losses, _, _), loaded = results
    resaved, losses = case_result(loaded, (src, dst))[0]
    a, b = _tensors(root, src), open_checkpoint(resaved)
    assert set(a.tensors) == set(b.tensors), set(a.tensors) ^ set(b.tensors)
    assert any(n.startswith("optim/") for n in a.tensors)
    assert not any(n.startswith("master/") for n in a.tensors)  # fp32 shards are the masters
    for name in sorted(a.tensors):
        assert torch.equal(a.full(name), b.full(name)), name
    for key in ("step", "samples_seen", "adam_step"):
        assert a.meta[key] == b.meta[key], key
    # The load-balancing loss is per rank's tokens: comparable only at the same dp and tp.
    same_routing = src[0].split("_")[0] == dst[0].split("_")[0] and "tp" not in src[0] + dst[0]
    compared = [0, 1, 2] if same_routing else [0, 2]
    torch.testing.assert_close(torch.tensor(losses)[compared], torch.tensor(next_losses[src])[compared],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
def test_stage3_shards_hold_what_plain_adamw_holds(results):
    """The same 2 steps at dp 4 x ep 2, stage 0 and stage 3: the checkpoints (parameters and
    Adam's moments, written by FSDP's shard holders at their blocks) agree tensor by tensor
    (atol 1e-6: the reductions differ in order)."""
    root, _, _ = results
    a, b = _tensors(root, ("dp4_ep2",)), _tensors(root, ("dp4_ep2", Z3))
    assert set(a.tensors) == set(b.tensors)
    for name in sorted(a.tensors):
        torch.testing.assert_close(b.full(name), a.full(name), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_stage3_resume_is_bitwise(results):
    """4 steps at stage 3 (evaluating, then saving, at steps 2 and 4), and the same run
    resumed from its step-2 checkpoint: the losses of steps 3 and 4 and every tensor of the
    step-4 checkpoints are bitwise equal (fp32, the same layout, so the RNG is restored)."""
    root, (_, whole, resumed), _ = results
    assert [h["step"] for h in resumed] == [3, 4]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in whole if h["step"] > 2]
    a = open_checkpoint(root / "whole" / "checkpoints" / "step_00000004")
    b = open_checkpoint(root / "resumed" / "checkpoints" / "step_00000004")
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.full(name), b.full(name)), name
