"""The project's own sbatch template under a real (one-machine) Slurm.

1. `sbatch slurm/train.sbatch` of the CPU config (2 tasks): the job completes and leaves
   a committed checkpoint; it is the uninterrupted reference. `slurm/train_torchrun.sbatch`
   (one torchrun agent per node, here one node of 2 workers) does the same.
2. The same job, sent `scancel --signal=USR1` after its first evaluation: the tasks agree on a
   step, checkpoint, exit 75; the script requeues the job; the second run resumes with
   resume=auto and ends at the same final losses as the uninterrupted job (bitwise: the resume
   is exact, tests/distributed/test_resume.py).
3. The scaling sweep (launcher.sweep --launcher slurm) submits one job per point and collects
   their summaries into the CSV and plot; a point whose job is preempted is waited for
   through the requeue, and the resumed run is what it reports.

Skipped, with the reason, where Slurm is not installed or cannot start (`.ci/run` installs
Debian's slurmctld, slurmd, slurm-client and munge).
"""

from __future__ import annotations

import csv
import json
import re
import threading
import time
from pathlib import Path

import pytest

from launcher.sweep import SLURM_ENDED
from checkpoint.store import committed
from tests.distributed.launch import ROOT, SMALL, TINY
from tests.slurm.cluster import Cluster, missing

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]
# 2 ranks (dp 2 x ep 2): on CI's 2 cores four would mostly measure process start-up. The first
# eval (step 2) is when a preemption test signals; the 38 steps after it keep the job running
# until the signal lands (with 15 a job once ended first, and was not requeued).
STEPS = 40
JOB = ["--config", TINY, *SMALL, "--parallel.dp=2", "--parallel.ep=2", f"--train.steps={STEPS}", "--train.eval_interval=2",
       "--logging.log_interval=1", "--logging.progress=false", "--logging.tensorboard=false"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(f"no Slurm here: {why}")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Exception as exc:  # noqa: BLE001 - the reason is the skip message
        c.stop()
        pytest.skip(f"Slurm did not start: {exc}")
    yield c
    c.stop()


def _submit(cluster, run_dir, log, template="train.sbatch", job=JOB):
    tasks = ["--ntasks-per-node=2"] if template == "train.sbatch" else []
    cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={log}", *tasks,
           f"--export=ALL,RUN_DIR={run_dir},PY={ROOT / '.venv' / 'bin' / 'python'},PROCS_PER_NODE=2",
           str(ROOT / "slurm" / template), *job]
    return cluster.run(*cmd)




def _run_job(cluster, run_dir, log, **kwargs):
    """Submit and wait for the end (polling: sbatch --wait sleeps up to seconds between
    checks); returns the job's final state and the log."""
    proc = _submit(cluster, run_dir, log, **kwargs)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    _wait(cluster, job, lambda: cluster.job_state(job).get("JobState") in SLURM_ENDED, 300, "the end")
    return cluster.job_state(job), log.read_text() if log.exists() else ""


def _wait(cluster, job, predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job}: {what} not seen in {timeout}s; {cluster.job_state(job)}")


def _preempt_and_release(cluster, job, log) -> None:
    """`scancel --signal=USR1` once the job has evaluated, then wait through its requeue to
    its end. Slurm holds a requeued job for 2 minutes (its begin time): its start is moved to
    now, but only once the first attempt is gone from the node and a few seconds have passed.
    Started at once, the new launch carries a credential from the same second as the
    requeue's revocation and slurmd kills it ("Job credential revoked", exit 1, seen in CI).
    And an update made before the job turns PENDING is lost."""
    _wait(cluster, job, lambda: log.exists() and "eval loss" in log.read_text(), 180, "training")
    assert cluster.run("scancel", "--signal=USR1", job).returncode == 0
    _wait(cluster, job, lambda: int(cluster.job_state(job).get("Restarts", 0)) >= 1, 120, "the requeue")
    seen = time.monotonic()

    def started_and_done() -> bool:
        state = cluster.job_state(job).get("JobState")
        idle = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle"
        if state == "PENDING" and idle and time.monotonic() - seen > 3:
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        return state == "COMPLETED"

    _wait(cluster, job, started_and_done, 180, "the end")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    run_dir, log = root / "run", root / "job.out"
    state, output = _run_job(cluster, run_dir, log)
    return state, run_dir, output


def test_sbatch_template_runs_and_checkpoints(uninterrupted):
    state, run_dir, output = uninterrupted
    assert state["JobState"] == "COMPLETED", output[-3000:]
    assert "launch: slurm" in output
    assert committed(run_dir / "checkpoints")[0].name == f"step_{STEPS:08d}"


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(cluster, uninterrupted, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    proc = _submit(cluster, run_dir, log)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    _preempt_and_release(cluster, job, log)
    output = log.read_text()
    state = cluster.job_state(job)
    assert state["JobState"] == "COMPLETED", output[-3000:]
    assert int(state.get("Restarts", 0)) >= 1
    assert "preempted: stopped on SIGUSR1" in output and "resumed from" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((uninterrupted[1] / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["final_eval_loss"] == reference["final_eval_loss"]
    # Every step logged (log_interval 1): the resumed attempt's losses are the reference's.
    losses = {h["step"]: h["loss"] for h in reference["train"]}
    assert summary["train"] and all(h["loss"] == losses[h["step"]] for h in summary["train"])


def test_torchrun_template_runs_and_checkpoints(cluster, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = [*JOB, "--train.steps=6"]
    state, output = _run_job(cluster, run_dir, log, template="train_torchrun.sbatch", job=job)
    assert state["JobState"] == "COMPLETED", output[-3000:]
    assert "launch: torchrun" in output and "placement: node 0: ranks [0, 1]" in output
    assert committed(run_dir / "checkpoints")[0].name == "step_00000006"



def test_scaling_sweep_submits_one_job_per_point(cluster, tmp_path, monkeypatch, capsys):
    """The README's sweep command with --launcher slurm: 1 node x 1 and x 2 tasks, strong."""
    from launcher.sweep import main as sweep

    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    out = tmp_path / "sweep"
    job = ["--config", TINY, *SMALL, "--train.steps=6", "--train.eval_interval=0",
           "--logging.tensorboard=false"]
    code = sweep(["--launcher", "slurm", "--nodes", "1", "--per-node", "1", "2", "--mode",
                  "strong", "--out", str(out), "--", *job])
    printed = capsys.readouterr().out
    assert code == 0, printed
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["world"], r["status"]) for r in rows] == [("1", "ok"), ("2", "ok")], printed
    assert all(float(r["train_tokens_per_s"]) > 0 for r in rows)
    for r in rows:
        (job_log,) = (Path(r["run_dir"])).glob("slurm-*.out")
        assert "launch: slurm" in job_log.read_text()
    assert (out / "scaling_strong.png").stat().st_size > 10_000


def test_sweep_waits_for_a_preempted_point_through_its_requeue(cluster, tmp_path, monkeypatch, capsys):
    """A point's job preempted mid-run (USR1): the sweep neither stops at the first attempt
    nor reports its figures; it waits for the requeued job, which resumes and ends, and
    reports that run."""
    from launcher.sweep import main as sweep

    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    out = tmp_path / "sweep"
    argv = ["--launcher", "slurm", "--nodes", "1", "--per-node", "2", "--mode", "strong",
            "--out", str(out), "--no-plots", "--", *JOB]
    ended: list[int] = []
    thread = threading.Thread(target=lambda: ended.append(sweep(argv)), daemon=True)
    thread.start()
    launch_log, job = out / "strong_1x2" / "launch.log", None
    deadline = time.monotonic() + 60
    while job is None:
        assert time.monotonic() < deadline and thread.is_alive(), \
            "the sweep ended, or submitted no job, within 60 s"
        text = launch_log.read_text() if launch_log.exists() else ""
        found = re.search(r"submitted job (\d+)", text)
        job = found and found.group(1)
        time.sleep(0.2)
    _preempt_and_release(cluster, job, out / "strong_1x2" / f"slurm-{job}.out")
    thread.join(timeout=60)
    printed = capsys.readouterr().out
    assert ended == [0], printed
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["world"], r["status"]) for r in rows] == [("2", "ok")], printed
    summary = json.loads((out / "strong_1x2" / "summary.json").read_text())
    assert summary["steps"] == STEPS and "stopped" not in summary
    assert int(cluster.job_state(job).get("Restarts", 0)) >= 1
