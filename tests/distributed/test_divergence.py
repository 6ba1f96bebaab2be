"""A non-finite step, in-process on 2 ranks (dp 2 x ep 2, with the routers' expert bias):
one rank's loss or gradients turn NaN; every rank learns it in the same step (one all-reduced
flag), and the step changes nothing: parameters, Adam's state and the expert bias are bitwise
those before it. train.max_nonfinite_steps bounds how many such steps are skipped."""

from __future__ import annotations

import pytest
import torch

from parallel.faults import install
from tests.distributed.ckpt_setup import make_trainer
from tests.distributed.spawn import run_distributed
from trainer.divergence import Diverged
from trainer.loop import _Window


def _state(trainer):
    opt = trainer.stepper.optimizer
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()}
               for n, p in trainer.model.named_parameters() if p in opt.state}
    bias = [m.router.expert_bias.clone() for m in trainer.model.moe_layers()]
    return params, moments, bias


def _same(a, b) -> bool:
    params_a, moments_a, bias_a = a
    params_b, moments_b, bias_b = b
    return (all(torch.equal(params_a[n], params_b[n]) for n in params_a)
            and all(torch.equal(moments_a[n][k], moments_b[n][k]) for n in moments_a for k in moments_a[n])
            and all(torch.equal(x, y) for x, y in zip(bias_a, bias_b)))


def _poison(kind, rank, step):
    def hook(name, **at):
        if name == "train.grads_ready" and (at["rank"], at["step"]) == (rank, step):
            with torch.no_grad():
                for p in at["model"].parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("inf") if kind == "inf" else float("nan"))
    return hook


def _skip_then_stop(rank, world, run_dir):
    trainer = make_trainer(rank, run_dir, "dp2_ep2", "--moe.bias_update_rate=0.01",
                           "--train.max_nonfinite_steps=1")
    install(_poison("nan", 1, 2))
    try:
        trainer.train_step(_Window())
        before = _state(trainer)
        check = trainer.train_step(_Window())  # rank 1's gradients are NaN in step 2
        skipped_changed_nothing = _same(before, _state(trainer))
        samples_after_skip = trainer.samples_seen
        trainer.train_step(_Window())
        moved = not _same(before, _state(trainer))
        install(_poison("inf", 0, 4))
        with pytest.raises(Diverged) as err:
            trainer.train_step(_Window())
        return (check.finite, skipped_changed_nothing, moved, trainer.step, samples_after_skip,
                trainer.skipped[0]["what"], str(err.value))
    finally:
        install(None)


@pytest.mark.distributed
def test_a_non_finite_step_is_seen_by_every_rank_and_changes_nothing():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = run_distributed(_skip_then_stop, 2, (tmp,), timeout_s=180)
    for finite, unchanged, moved, step, samples, first, second in results:
        assert finite is False and unchanged and moved
        assert step == 3 and samples == 2 * 8  # step 4 raised uncounted; the skipped batch is passed over
        assert first == "step 2: the gradient norm is nan"
        assert second == "step 4: the gradient norm is inf"
    assert results[0][5:] == results[1][5:]


def _check_one_rank(rank, world):
    from trainer.divergence import check_step

    loss = torch.tensor(float("nan") if rank == 1 else 2.0)
    return check_step(loss, torch.tensor(0.5), stop_flag=2 if rank == 0 else 0)


@pytest.mark.distributed
def test_one_ranks_loss_and_another_ranks_signal_reach_every_rank():
    for check in run_distributed(_check_one_rank, 2, timeout_s=60):
        assert (check.stop, check.loss_finite, check.norm_finite) == (2, False, True)
