"""A run never destroys good work, and every ending has its exit code (launcher/exit_codes.py).

Through `moe-run` (launcher.agent: torchrun returning the job's code), 2 ranks, dp 2 x ep 2:
- a config error: one message, code 2, no traceback;
- divergence (one rank's gradients made NaN at step 3, tests/faults.py): every rank stops at
  step 3 with code 6 naming the step and the quantity; the step-2 checkpoint stays `latest`;
  nothing non-finite is saved; summary.json is strict JSON; with train.max_nonfinite_steps=1
  the step is skipped instead and the run ends normally;
- a real divergence (lr 1e3) resumed from a good run with keep_last 2: the good checkpoint
  survives and every committed checkpoint is finite;
- two jobs on one run dir: the second is refused (code 7) naming the first's host and pid; the
  first, stopped by SIGTERM to its agent, exits 75 with its checkpoint and its summary;
- a finished run resumed: code 0, files untouched; train.steps below it: code 2; a fresh
  start into it: code 2 unless logging.start_over; every checkpoint broken: code 4;
- data too small for the layout: code 5, said once;
- Ctrl-C (SIGINT to the job's process group): a checkpoint, then code 130.
A full disk (a small tmpfs where one can be mounted, else an injected ENOSPC) is in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from checkpoint.reader import open_checkpoint
from checkpoint.store import committed
from tests.distributed.launch import ROOT, SMALL, TINY, _env, torchrun

BASE = ["--config", TINY, *SMALL, "--parallel.dp=2", "--parallel.ep=2", "--train.eval_interval=0",
        "--logging.progress=false", "--logging.tensorboard=false", "--parallel.timeout_s=60"]


def moe_run(*args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return torchrun(2, *BASE, *args, runner="launcher.agent", fault=fault, timeout=timeout)


def training(*args: str, session: bool = False) -> tuple[subprocess.Popen, list[str]]:
    """A long moe-run job in the background (`session`: in its own process group, as a
    terminal's foreground job is), once it is training; its output lines, collected."""
    job = subprocess.Popen(
        [sys.executable, "-m", "launcher.agent", "--nproc_per_node=2", "--standalone", "-m",
         "launcher.train", *BASE, "--train.steps=100000", *args],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=session)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any(x.startswith("device:") for x in lines):
        assert time.monotonic() < deadline and job.poll() is None, "".join(lines)
        time.sleep(0.2)
    return job, lines


def strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def verified(run_dir) -> list[int]:
    """The steps of the committed checkpoints, each checked finite by the inspect command."""
    steps = []
    for path in committed(run_dir / "checkpoints"):
        proc = subprocess.run([sys.executable, "-m", "launcher.inspect_checkpoint", "--summary", str(path)],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "every tensor is finite" in proc.stdout, proc.stdout
        steps.append(open_checkpoint(path).step)
    return steps


@pytest.mark.distributed
def test_a_config_error_through_moe_run_is_said_once_with_its_code(tmp_path):
    proc = moe_run(f"--logging.run_dir={tmp_path}", "--moe.top_kk=2", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "config error" in x]
    assert lines == ["config error: unknown config key 'moe.top_kk' (did you mean 'moe.top_k'?) "
                     "(exit code 2)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "config.yaml").exists()


@pytest.mark.distributed
def test_data_too_small_for_the_layout_is_a_data_error(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("too little " * 20)
    proc = moe_run(f"--logging.run_dir={tmp_path / 'run'}", "--data.source=text", f"--data.path={text}",
                   timeout=120)
    assert proc.returncode == 5, proc.stderr[-3000:]
    # said once: by rank 0, or by the agent for the rank that failed first (torchrun then
    # stops the others, which may not have got as far)
    lines = [x for x in proc.stderr.splitlines() if "data error: held-out data" in x]
    assert len(lines) == 1 and "fewer than micro_batch_size * dp_size" in lines[0], proc.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_non_finite_step_stops_every_rank_or_is_skipped_and_nothing_non_finite_is_saved(tmp_path):
    stop, skip = tmp_path / "stop", tmp_path / "skip"
    args = ["--train.steps=5", "--checkpoint.interval=2", "--logging.log_interval=1"]
    proc = moe_run(f"--logging.run_dir={stop}", *args, fault="nan_grads:1@3")
    assert proc.returncode == 6, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "diverged: step 3: the gradient norm is nan; the last checkpoint, of step 2, is from before it" in out, out[-3000:]
    assert verified(stop) == [2] and (stop / "checkpoints" / "latest").read_text() == "step_00000002"
    summary = strict_json(stop / "summary.json")
    assert summary["steps"] == 2 and summary["diverged"].startswith("step 3:")
    assert [h["step"] for h in summary["train"]] == [1, 2]

    proc = moe_run(f"--logging.run_dir={skip}", *args, "--train.max_nonfinite_steps=1", fault="nan_grads:1@3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: step 3: the gradient norm is nan: the step is skipped (1 of " in proc.stdout
    summary = strict_json(skip / "summary.json")
    assert summary["steps"] == 5 and [s["step"] for s in summary["skipped_steps"]] == [3]
    assert [h["step"] for h in summary["train"]] == [1, 2, 4, 5]
    assert verified(skip) == [5, 4, 2]
    # the skipped step changed nothing: the step-4 update started from step 2's state, so
    # steps 1, 2 match the stopped run exactly
    stopped = strict_json(stop / "summary.json")["train"]
    assert [h["loss"] for h in summary["train"][:2]] == [h["loss"] for h in stopped]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_diverging_resume_keeps_the_good_checkpoint(tmp_path):
    good = ["--train.steps=4", "--checkpoint.interval=2"]
    assert moe_run(f"--logging.run_dir={tmp_path}", *good).returncode == 0
    proc = moe_run(f"--logging.run_dir={tmp_path}", "--train.steps=40", "--checkpoint.interval=1",
                   "--checkpoint.keep_last=2", "--train.lr=1e3", "--train.warmup_steps=1",
                   "--checkpoint.resume=auto")
    assert proc.returncode == 6, proc.stderr[-3000:]
    steps = verified(tmp_path)
    assert 4 in steps and max(steps) <= strict_json(tmp_path / "summary.json")["steps"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_second_job_on_a_run_dir_is_refused_naming_the_first(tmp_path):
    first, lines = training(f"--logging.run_dir={tmp_path}")
    holder = json.loads((tmp_path / "LOCK").read_text())
    second = moe_run(f"--logging.run_dir={tmp_path}", "--train.lr=1e-2", timeout=120)
    assert second.returncode == 7, second.stderr[-3000:]
    assert (f"run dir {tmp_path} is in use by another job: host {holder['host']}, pid "
            f"{holder['pid']}") in second.stderr, second.stderr[-3000:]
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 75, "".join(lines[-30:])
    time.sleep(0.5)
    summary = strict_json(tmp_path / "summary.json")
    assert "SIGTERM" in summary["stopped"]
    assert verified(tmp_path) == [summary["steps"]]
    assert "lr: 0.01" not in (tmp_path / "config.yaml").read_text()  # the first job's config
    assert not (tmp_path / "LOCK").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_finished_run_is_left_alone_and_a_used_run_dir_is_not_reused_silently(tmp_path):
    assert moe_run(f"--logging.run_dir={tmp_path}", "--train.steps=3").returncode == 0
    meta = open_checkpoint(committed(tmp_path / "checkpoints")[0]).meta
    assert meta["tokenizer"]["kind"] == "bytes" and meta["data_fingerprint"]["roots"]  # what resume checks
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}

    proc = moe_run(f"--logging.run_dir={tmp_path}", "--train.steps=3", "--checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {tmp_path} already reached train.steps (3)" in proc.stdout
    proc = moe_run(f"--logging.run_dir={tmp_path}", "--train.steps=2", "--checkpoint.resume=auto")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.steps (2) is below the step of the checkpoint to resume" in proc.stderr
    assert "(3)" in proc.stderr
    proc = moe_run(f"--logging.run_dir={tmp_path}", "--train.steps=3")
    assert proc.returncode == 2 and f"logging.run_dir ({tmp_path}) holds a run" in proc.stderr
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before

    proc = moe_run(f"--logging.run_dir={tmp_path}", "--train.steps=2", "--logging.start_over=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    previous = next(tmp_path.glob("previous_*"))
    assert strict_json(previous / "summary.json")["steps"] == 3
    assert strict_json(tmp_path / "summary.json")["steps"] == 2

    for shard in (tmp_path / "checkpoints").glob("step_*/shard_*.pt"):
        data = bytearray(shard.read_bytes())
        data[-100] ^= 0xFF
        shard.write_bytes(bytes(data))
    proc = moe_run(f"--logging.run_dir={tmp_path}", "--train.steps=4", "--checkpoint.resume=auto")
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "none of the 1 committed checkpoints" in proc.stderr and "is corrupted" in proc.stderr
    assert [p.name for p in committed(tmp_path / "checkpoints")] == ["step_00000002"]


@pytest.mark.distributed
@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_then_exits_130(tmp_path):
    job, lines = training(f"--logging.run_dir={tmp_path}", "--logging.log_interval=1", session=True)
    time.sleep(3)
    os.killpg(job.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the agent and its workers
    assert job.wait(timeout=120) == 130, "".join(lines[-30:])
    time.sleep(0.5)
    summary = strict_json(tmp_path / "summary.json")
    assert "SIGINT" in summary["stopped"] and verified(tmp_path) == [summary["steps"]]
    assert "interrupted: stopped on" in "".join(lines)
    assert "Traceback" not in "".join(lines)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_requeued_fine_tune_resumes_its_own_checkpoint_not_its_start(tmp_path):
    """resume=auto with init_from (what a Slurm template and a fine-tune give together): the
    first attempt starts from init_from's weights; a later one continues its own run."""
    base, tune = tmp_path / "base", tmp_path / "tune"
    assert moe_run(f"--logging.run_dir={base}", "--train.steps=2").returncode == 0
    args = [f"--logging.run_dir={tune}", f"--checkpoint.init_from={base / 'checkpoints'}",
            "--checkpoint.resume=auto", "--checkpoint.interval=1", "--train.seed=7"]
    first = moe_run(*args, "--train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"weights from {base / 'checkpoints' / 'step_00000002'} (step 2)" in first.stdout
    again = moe_run(*args, "--train.steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tune / 'checkpoints' / 'step_00000002'}: step 2" in again.stdout
    assert "weights from" not in again.stdout
