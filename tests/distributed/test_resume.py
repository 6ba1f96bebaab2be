"""Exact resume and a rank killed mid-save, through torchrun as users run it (2 ranks, dp 2 x ep 2).

A: 8 steps uninterrupted, checkpoints at steps 4 and 8.
B: the same run, but rank 1 is SIGKILLed right after writing its shard of the step-8
   checkpoint: the job fails within the collective timeout, step 8 is not visible, step 4 is
   intact and `latest` still names it.
C: new processes with --checkpoint.resume=auto in B's run dir: they continue from step 4, and
   the losses of steps 5..8 and the final parameters and optimizer state are bitwise equal to
   A's (fp32, deterministic algorithms, the same layout).
D: torchrun --max-restarts=1 with resume=auto, rank 1 crashing after step 6 of the first
   attempt: the agent restarts the workers, they resume from step 4 and end bitwise equal to A.

The native backend's step draws no random numbers, so these runs cannot show the RNG state
coming back; test_a_random_step_resumes_exactly does, on the deepspeed backend.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from checkpoint.reader import open_checkpoint, resolve
from checkpoint.store import committed
from tests.distributed.ckpt_setup import make_trainer, step_losses
from tests.distributed.launch import SMALL, TINY, torchrun
from tests.distributed.spawn import run_distributed

TIMEOUT_S = 30
ARGS = ["--config", TINY, *SMALL, "--parallel.dp=2", "--parallel.ep=2", "--train.steps=8", "--checkpoint.interval=4",
        "--logging.log_interval=1", "--train.eval_interval=0", "--train.deterministic=true",
        "--logging.progress=false", "--logging.tensorboard=false", f"--parallel.timeout_s={TIMEOUT_S}"]


def _losses(run_dir):
    return {h["step"]: h["loss"] for h in json.loads((run_dir / "summary.json").read_text())["train"]}


def _assert_same_final_state(a, b):
    _assert_same_checkpoint(a / "checkpoints" / "step_00000008", b / "checkpoints" / "step_00000008")


def _assert_same_checkpoint(a, b):
    want, got = open_checkpoint(a), open_checkpoint(b)
    got.verify()
    assert set(want.tensors) == set(got.tensors)
    assert any(n.startswith("optim/") for n in want.tensors)
    for name in want.tensors:
        assert torch.equal(want.full(name), got.full(name)), name
    assert want.meta["samples_seen"] == got.meta["samples_seen"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_save_and_a_crashed_worker_both_resume_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    proc = torchrun(2, *ARGS, f"--logging.run_dir={a}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    start = time.monotonic()
    proc = torchrun(2, *ARGS, f"--logging.run_dir={b}", fault="kill_in_save:1@8")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, "the job must fail when a rank dies during a save"
    assert elapsed < 3 * TIMEOUT_S + 60, f"took {elapsed:.0f}s to fail"
    root = b / "checkpoints"
    assert [p.name for p in committed(root)] == ["step_00000004"]
    assert (root / "latest").read_text() == "step_00000004"
    assert not (root / "step_00000008").exists()
    ckpt, skipped = resolve("auto", root)
    assert ckpt.step == 4 and not skipped

    proc = torchrun(2, *ARGS, f"--logging.run_dir={b}", "--checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout
    uninterrupted, resumed = _losses(a), _losses(b)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == [uninterrupted[s] for s in range(5, 9)]

    _assert_same_final_state(a, b)

    d = tmp_path / "d"
    proc = torchrun(2, "--max-restarts=1", *ARGS, f"--logging.run_dir={d}", "--checkpoint.resume=auto",
                    fault="crash_after:1@6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout  # the restarted attempt
    resumed = _losses(d)
    assert [resumed[s] for s in range(5, 9)] == [uninterrupted[s] for s in range(5, 9)]
    _assert_same_final_state(a, d)


# Every step draws random numbers: Gumbel noise on the top-1 choice (rsample) and random token
# selection when an expert overflows its capacity (use_rts), from torch's CPU generator.
RANDOM_STEP = ["--moe.backend=deepspeed", "--moe.top_k=1", "--moe.noisy_gate_policy=rsample",
               "--moe.use_rts=true", "--moe.drop_tokens=true", "--moe.capacity_factor=0.5"]


def _random_run(rank, world, root):
    """2 steps, save, 2 more, save; then a new trainer resumes the first checkpoint and takes
    the same 2 steps. Returns the RNG states (at the save, after the resume, at the end),
    both runs' last 2 losses and final checkpoints."""
    a = make_trainer(rank, f"{root}/a", "dp2_ep2", *RANDOM_STEP)
    torch.manual_seed(100 + rank)  # each rank its own stream: a rank given another's shows
    for _ in range(2):
        step_losses(a)
    at_save = torch.get_rng_state()
    saved = a.save()
    losses_a = [step_losses(a) for _ in range(2)]
    end_a = a.save()
    b = make_trainer(rank, f"{root}/b", "dp2_ep2", *RANDOM_STEP)
    meta = b.resume(open_checkpoint(saved))
    after_resume = torch.get_rng_state()
    losses_b = [step_losses(b) for _ in range(2)]
    return (meta["rng_restored"], at_save, after_resume, torch.get_rng_state(), losses_a, losses_b,
            str(end_a), str(b.save()))


@pytest.mark.distributed
def test_a_random_step_resumes_exactly(tmp_path):
    """deepspeed backend at dp 2 x ep 2 with noisy top-1 gating and random token selection:
    after loading, each rank's RNG state is the one it saved, and the resumed steps (losses,
    then every parameter and moment) are bitwise those of the uninterrupted run."""
    ranks = run_distributed(_random_run, 2, (str(tmp_path),), timeout_s=300)
    for rank, (restored, at_save, after_resume, end, losses_a, losses_b, end_a, end_b) in enumerate(ranks):
        assert restored, f"rank {rank}: RNG not restored"
        assert not torch.equal(at_save, end), f"rank {rank}: the steps drew no random numbers"
        assert torch.equal(after_resume, at_save), f"rank {rank}: RNG state after loading is not the saved one"
        assert losses_b == losses_a, f"rank {rank}"
    assert not torch.equal(ranks[0][1], ranks[1][1]), "the ranks' RNG streams should differ"
    _assert_same_checkpoint(ranks[0][6], ranks[0][7])
