"""Training on a mixture of two prepared datasets resumes and reshards exactly.

A (2 ranks, dp 2 x ep 2): fit() for 2 steps (it evaluates and saves at step 2), then steps 3
and 4, recording their losses and the global batch each read. B (2 new processes, the same
layout): resume from A's checkpoint: steps 3 and 4 read the same batches and give bitwise
the same losses. C (1 process, dp 1, the same global batch of 8 sequences): the same
batches, and the first step's losses equal to A's within rtol 1e-5 (the reductions group
differently).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from launcher.config import load_config
from launcher.train import build_model
from checkpoint.reader import resolve
from parallel.topology import Topology
from tests.distributed.ckpt_setup import SMALL
from tests.distributed.spawn import run_distributed
from tests.unit.data_setup import two_datasets
from trainer.data import load_corpus, rank_data
from trainer.loop import Trainer, _Window

LAYOUTS = {2: ["--parallel.dp=2", "--parallel.ep=2", "--train.micro_batch_size=4"],
           1: ["--parallel.dp=1", "--parallel.ep=1", "--train.micro_batch_size=8"]}


def _trainer(rank: int, run_dir: str, data: list[str]) -> Trainer:
    job = load_config(["--config", "configs/cpu_tiny.yaml", *SMALL, *LAYOUTS[dist.get_world_size()],
                       "--train.steps=2", "--train.deterministic=true", "--logging.tensorboard=true",
                       f"--logging.run_dir={run_dir}", *data])
    torch.use_deterministic_algorithms(True)
    layout = job.validate(dist.get_world_size())
    corpus = load_corpus(job.data)
    rank_part = rank_data(corpus, job.train, job.model.vocab_size, layout.coords(rank)["dp"], layout.dp)
    topology = Topology.create(layout)
    return Trainer(job, build_model(job, topology, torch.device("cpu")), topology, torch.device("cpu"),
                   rank_part, local_rank=rank)


def _next_steps(trainer: Trainer, count: int) -> list[tuple[list[float], torch.Tensor]]:
    """Take `count` steps; per step its (lm, aux, z) losses averaged over dp and the global
    batch (every dp rank's inputs, in dp order). Collective."""
    out = []
    for _ in range(count):
        inputs = trainer.sampler.batch_at(trainer.samples_seen)[0]
        window = _Window()
        trainer.train_step(window)
        losses = window.losses.clone()
        dist.all_reduce(losses)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (trainer.sampler.dp_rank, inputs))
        out.append(((losses / dist.get_world_size()).tolist(), torch.cat([x for _, x in sorted(everyone)])))
    return out


def _first_run(rank, world, run_dir, data):
    trainer = _trainer(rank, run_dir, data)
    summary = trainer.fit()
    return summary, trainer.val_bytes_per_token, _next_steps(trainer, 2)


def _resumed(rank, world, run_dir, ckpt_dir, data):
    trainer = _trainer(rank, run_dir, data)
    trainer.resume(resolve(ckpt_dir, run_dir)[0])
    return _next_steps(trainer, 2)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    a, b = two_datasets(root, files=30, size=1000, unit_bytes=3000)
    data = ["--data.source=prepared", f"--data.path={a},{b}", "--data.weights=3,1",
            "--model.vocab_size=264"]  # bytes and EOS (256)
    first = run_distributed(_first_run, 2, (str(root / "run_a"), data), timeout_s=300)[0]
    ckpt = str(root / "run_a" / "checkpoints")
    same = run_distributed(_resumed, 2, (str(root / "run_b"), ckpt, data), timeout_s=300)[0]
    dp1 = run_distributed(_resumed, 1, (str(root / "run_c"), ckpt, data), timeout_s=300)[0]
    return root, first, same, dp1


@pytest.mark.distributed
def test_resume_at_the_same_layout_reads_the_same_batches_and_is_bitwise_equal(mixture):
    _, (_, _, steps), same, _ = mixture
    for (loss_a, batch_a), (loss_b, batch_b) in zip(steps, same):
        assert torch.equal(batch_b, batch_a)
        assert loss_b == loss_a
    assert not torch.equal(steps[0][1], steps[1][1])


@pytest.mark.distributed
def test_resume_at_dp1_reads_the_same_global_batches(mixture):
    _, (_, _, steps), _, dp1 = mixture
    for (_, batch_a), (_, batch_c) in zip(steps, dp1):
        assert batch_c.shape == batch_a.shape == (8, 16)
        assert torch.equal(batch_c, batch_a)
    # The first step's LM and z losses are token means: equal at any layout. The aux loss is
    # computed per rank on its own tokens, so it differs, and through its gradient so does
    # every later step (test_reshard.py compares the next step only, too).
    torch.testing.assert_close(torch.tensor(dp1[0][0])[[0, 2]], torch.tensor(steps[0][0])[[0, 2]], rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
def test_summary_and_tensorboard_carry_bits_per_byte(mixture):
    root, (summary, bytes_per_token, _), _, _ = mixture
    on_disk = json.loads((root / "run_a" / "summary.json").read_text())
    assert on_disk["final_eval_bpb"] == summary["final_eval_bpb"]
    assert 0.9 < bytes_per_token < 1.0  # bytes, and one EOS per document
    assert summary["final_eval_bpb"] == pytest.approx(summary["final_eval_loss"] / math.log(2) / bytes_per_token,
                                                      rel=1e-12)
    assert summary["evals"][-1]["eval_bpb"] == summary["final_eval_bpb"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "run_a" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("eval/bpb")] == pytest.approx([summary["final_eval_bpb"]], rel=1e-6)
