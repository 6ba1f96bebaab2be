"""The real entry point under torchrun, Slurm-style variables and a single process.

These run `python -m launcher.train` as users do, each with a timeout, and read what the run
leaves behind (summary.json, TensorBoard events, the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from launcher.config import load_config
from launcher.env import DistEnv
from launcher.train import prepare
from model.errors import ConfigError
from model.transformer import TransformerLM
from checkpoint.load import load_weights
from checkpoint.reader import open_checkpoint
from tests.distributed.launch import ROOT, SMALL, TINY, _env, torchrun
from trainer.data import eval_batches, load_corpus

# The README's default run (4 ranks, dp 4 x ep 4), shortened: 20 steps are all warmup, so the
# first 10 follow the same learning rates as any run of 10 steps and serve as the dp 4 x ep 4
# side of the layout comparison below.
DEFAULT_STEPS, EVAL_EVERY = 20, 10


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("default") / "run"
    proc = torchrun(4, "--config", TINY, f"--train.steps={DEFAULT_STEPS}", f"--train.eval_interval={EVAL_EVERY}",
                    "--logging.log_interval=5", f"--logging.run_dir={run_dir}",
                    f"--logging.heatmap_interval={EVAL_EVERY}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.distributed
@pytest.mark.slow
def test_default_run_learns_and_its_checkpoint_reproduces_the_eval_loss(default_run):
    """4 ranks, ep=4, the built-in data: held-out loss falls well below ln(256) = 5.55."""
    run_dir, summary = default_run
    print(json.dumps(summary["evals"]))
    first, last = summary["evals"][0]["eval_loss"], summary["final_eval_loss"]
    assert last < 3.2 < math.log(256), summary
    assert last < first

    assert (run_dir / "config.yaml").is_file()
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "eval/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/aux_loss", "train/z_loss", "moe/layer0/max_over_mean",
                "moe/layer3/busiest_expert_fraction", "moe/router_entropy"):
        assert tag in tags["scalars"], tag
    assert "moe/expert_load" in tags["images"]
    assert sorted(p.name for p in (run_dir / "expert_load").iterdir()) == [
        "latest.png", "step_00000010.png", "step_00000020.png"]

    # The checkpoint holds the global-shape weights: loaded at ep=1 in this one process, it
    # reproduces the eval loss the 4 ranks computed together (mean over their eval shards).
    job = load_config(["--config", TINY])
    model = TransformerLM(job.model, job.moe)
    ckpt = open_checkpoint(summary["checkpoint"])
    ckpt.verify()
    load_weights(ckpt, model)
    assert ckpt.step == DEFAULT_STEPS and ckpt.meta["layout"]["ep"] == 4
    corpus = load_corpus(job.data)
    losses = []
    with torch.no_grad():
        model.eval()
        for dp_rank in range(4):
            batches = eval_batches(corpus.val, job.train.seq_len, job.train.micro_batch_size,
                                   dp_rank, 4, job.train.eval_batches)
            losses += [model(x, y).lm_loss.item() for x, y in batches]
    assert sum(losses) / len(losses) == pytest.approx(last, abs=1e-4)


BAD_INPUT = [
    (["--moe.num_experts=5", "--parallel.ep=2", "--parallel.dp=2"],
     "moe.num_experts (5) must be divisible by parallel.ep (2)"),
    (["--moe.top_k=9"], "moe.top_k (9) must be between 1 and moe.num_experts (8)"),
    (["--parallel.dp=2", "--parallel.ep=4"], "parallel.ep (4) must divide parallel.dp (2)"),
    ([], "WORLD_SIZE (2) must equal parallel.dp (4) x tp (1)"),
    (["--data.source=text", "--data.path=/nonexistent/corpus"], "data.path (/nonexistent/corpus) does not exist"),
    (["--moe.top_kk=2"], "unknown config key 'moe.top_kk' (did you mean 'moe.top_k'?)"),
    (["--train.steps=ten"], "train.steps must be an integer, got 'ten'"),
    (["--parallel.dp=1", "--parallel.tp=2", "--parallel.ep=1", "--model.n_heads=1", "--model.dim=64"],
     "model.n_heads (1) must be divisible by parallel.tp (2)"),
    (["--parallel.dp=2", "--parallel.zero_stage=4"], "parallel.zero_stage (4) must be 0, 1, 2 or 3"),
    (["--parallel.dp=2", "--parallel.ep=2", "--logging.run_dir=/dev/null/run"], "logging.run_dir (/dev/null/run) cannot be created"),
]


def launch_ranks(world: int, *args: str, timeout: float = 120) -> list[tuple[int, str, str]]:
    """Start `world` processes with the variables torchrun would set, but no agent: unlike
    torchrun, which stops the other workers at the first failure, every rank runs to its
    own end, so each rank's own message can be checked."""
    procs = []
    for rank in range(world):
        env = _env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
        cmd = [sys.executable, "-m", "launcher.train", *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@pytest.mark.parametrize("overrides, message", BAD_INPUT, ids=[m.split(" ")[0] for _, m in BAD_INPUT])
def test_bad_input_is_refused_by_prepare_on_every_rank(overrides, message, tmp_path):
    """Every check runs in prepare(), which opens no process group: here as ranks 0 and 1
    of a world of 2, in this process. (Three of them also run as real processes below.)"""
    for rank in (0, 1):
        env = DistEnv(rank, rank, 2, 2, "127.0.0.1", 1, "torchrun")
        with pytest.raises(ConfigError) as err:
            prepare(["--config", TINY, f"--logging.run_dir={tmp_path}", *overrides], env)
        assert message in str(err.value)


REAL_PROCESSES = [BAD_INPUT[0], BAD_INPUT[3], BAD_INPUT[-1]]  # config, WORLD_SIZE, run dir


@pytest.mark.distributed
@pytest.mark.parametrize("overrides, message", REAL_PROCESSES, ids=[m.split(" ")[0] for _, m in REAL_PROCESSES])
def test_bad_input_fails_on_every_rank_before_any_collective(overrides, message, tmp_path):
    # MASTER_PORT=1 cannot be joined: a rank that got as far as a collective would fail
    # differently, so exit code 2 and the message prove the check came first.
    results = launch_ranks(2, "--config", TINY, f"--logging.run_dir={tmp_path}", *overrides)
    for rank, (code, _, err) in enumerate(results):
        assert code == 2, err[-3000:]
        assert f"{_prefix(rank)}config error: {message}" in err, err[-3000:]
        assert "Traceback" not in err


def _prefix(rank: int) -> str:
    """Rank 0 says an input error plainly; the others name themselves (without a launcher
    that collects their exit records, each says it: a rank-local error must not be lost)."""
    return "" if rank == 0 else f"[rank {rank}] "


@pytest.mark.distributed
def test_bad_input_under_torchrun_ends_the_job_quickly(tmp_path):
    proc = torchrun(2, "--config", TINY, f"--logging.run_dir={tmp_path}", "--moe.top_k=9", timeout=120)
    assert proc.returncode != 0
    assert "config error: moe.top_k (9) must be between 1 and moe.num_experts (8)" in proc.stderr


@pytest.mark.distributed
def test_yaml_key_that_does_not_exist(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe:\n  capacity: 2\n")
    for rank, (code, _, err) in enumerate(launch_ranks(2, "--config", str(bad))):
        assert code == 2 and f"{_prefix(rank)}config error: unknown config key 'moe.capacity'" in err, err


@pytest.mark.distributed
def test_slurm_launch_without_torchrun(tmp_path):
    """`srun python -m launcher.train` sets SLURM_* only: two such tasks train together."""
    procs = []
    for rank in range(2):
        env = _env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_TASKS_PER_NODE="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost",
                   SLURM_JOB_ID=str(40000 + os.getpid() % 10000), SLURM_STEP_ID="0")
        cmd = [sys.executable, "-m", "launcher.train", "--config", TINY, "--parallel.dp=2",
               "--parallel.ep=2", "--train.steps=3", f"--logging.run_dir={tmp_path}", *SMALL]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "launch: slurm" in outputs[0][0]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


@pytest.mark.distributed
def test_single_process_without_a_launcher(tmp_path):
    cmd = [sys.executable, "-m", "launcher.train", "--config", TINY, "--parallel.dp=null",
           "--parallel.ep=1", "--train.steps=2", f"--logging.run_dir={tmp_path}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launch: single" in proc.stdout and "world 1 = dp 1" in proc.stdout
    assert (tmp_path / "checkpoints" / "step_00000002" / "COMMIT").is_file()


@pytest.mark.distributed
@pytest.mark.slow
def test_dp2_tp2_ep2_tracks_dp4_ep4_on_the_same_global_batch(default_run, tmp_path):
    """Same weights, same 32 sequences per step (dp2 x 16 = the default run's dp4 x 8) and
    the same learning rates (warmup). The two differ only in the load-balancing loss (each
    rank computes it on its own tokens) and fp32 summation order; measured over 20 steps:
    equal to 6 digits through step 10, then early training's sensitivity (routing flips at
    lr 3e-3) lets them drift apart by about 1.5% at step 20. 10 steps here; tolerance 3%.
    The tp2 run also recomputes its blocks in backward (train.recompute=full), which changes
    no number (tests/unit/test_recompute.py): here it goes through the launcher's config."""
    proc = torchrun(4, "--config", TINY, f"--train.steps={EVAL_EVERY}", f"--train.eval_interval={EVAL_EVERY}",
                    "--logging.log_interval=5", "--logging.tensorboard=false", "--parallel.dp=2",
                    "--parallel.tp=2", "--parallel.ep=2", "--train.micro_batch_size=16",
                    "--train.recompute=full", f"--logging.run_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world 4 = dp 2 x tp 2; ep 2" in proc.stdout
    assert "recompute full in backward" in proc.stdout
    tp2 = json.loads((tmp_path / "summary.json").read_text())
    dp4 = default_run[1]
    a = [x for x in dp4["train"] + dp4["evals"] if x["step"] <= EVAL_EVERY]
    b = tp2["train"] + tp2["evals"]
    print(json.dumps({"dp4": a, "tp2": b}))
    assert a[1]["loss"] < a[0]["loss"] - 0.5  # it learns
    assert [x["step"] for x in a] == [x["step"] for x in b] == [5, 10, 10]
    for x, y in zip(a, b):
        loss_a, loss_b = x.get("loss", x.get("eval_loss")), y.get("loss", y.get("eval_loss"))
        assert loss_b == pytest.approx(loss_a, rel=0.03), (x, y)


@pytest.mark.distributed
def test_deepspeed_backend_with_zero2_under_torchrun(tmp_path):
    """The README's main command with --moe.backend=deepspeed (dropping tokens at capacity
    factor 1) and ZeRO-2: it trains, and TensorBoard gets the dropped-slot fraction."""
    proc = torchrun(4, "--config", TINY, "--moe.backend=deepspeed", "--parallel.zero_stage=2",
                    "--train.steps=4", "--logging.log_interval=2", f"--logging.run_dir={tmp_path}",
                    *SMALL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train"][-1]["loss"] < summary["train"][0]["loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    dropped = [e.value for e in acc.Scalars("moe/dropped_fraction")]
    assert dropped and all(0 <= v < 1 for v in dropped), dropped
    assert "moe/layer1/dropped_slots" in acc.Tags()["scalars"]
