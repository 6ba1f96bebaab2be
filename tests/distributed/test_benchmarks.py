"""The end-to-end benchmark's harness on CPU (benchmarks/e2e.py --smoke): a torchrun run of
the native backend, its summary read back; megablocks skipped, with the reason, without CUDA.
And the smoke runs of profile_step.py and activation_memory.py. No speed is asserted."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest

from tests.distributed.launch import ROOT, _env


@pytest.mark.distributed
@pytest.mark.slow
def test_e2e_smoke_runs_native_and_reads_its_summary(tmp_path):
    """One named variant: its overrides reach the run (micro-batch 1 of 32 tokens per step)."""
    proc = subprocess.run([sys.executable, "benchmarks/e2e.py", "--smoke", "--steps", "4",
                           "--backend", "native", "megablocks", "--variant", "mb1=--train.micro_batch_size=1",
                           "--peak-tflops", "0.1", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["run"]: r for r in json.loads((tmp_path / "e2e.json").read_text())["rows"]}
    assert rows["megablocks:mb1"]["status"] == "skipped: megablocks needs CUDA"
    r = rows["native:mb1"]  # (the deepspeed backend trains through the same path: test_layouts.py)
    assert (r["backend"], r["variant"], r["overrides"]) == ("native", "mb1", ["--train.micro_batch_size=1"])
    summary = json.loads((tmp_path / "e2e_native_mb1" / "summary.json").read_text())
    assert summary["tokens_per_step"] == 1 * 32
    assert r["status"] == "ok" and r["train_tokens_per_s"] == summary["train_tokens_per_s"] > 0
    assert r["mfu"] == pytest.approx(r["train_tokens_per_s"] * r["flops_per_token"] / 0.1e12)
    assert r["peak_memory_bytes"] > 0 and r["final_eval_loss"] > 0
    # byte data: bits per byte is the loss (nats per byte) / ln 2
    assert r["evals"][-1] == pytest.approx({"step": 4, "eval_loss": r["final_eval_loss"],
                                            "eval_bpb": r["final_eval_loss"] / math.log(2)})
    assert "native:mb1" in proc.stdout and "skipped: megablocks needs CUDA" in proc.stdout


def test_e2e_variant_names_must_name_a_directory():
    from benchmarks.e2e import parse_variant

    assert parse_variant("compile=--train.compile=true --x=1") == ("compile", ["--train.compile=true", "--x=1"])
    assert parse_variant("eager") == ("eager", [])
    with pytest.raises(SystemExit, match=r"its name \('a/b'\) must be letters"):
        parse_variant("a/b=--x=1")


def test_e2e_timeout_kills_the_workers_too():
    """A timed-out run's whole session goes: torchrun's worker outlived a kill of torchrun alone
    on the GPU machine and held 49 GiB, so the next backend ran out of memory."""
    import os
    import time

    from benchmarks.e2e import _kill_session

    # a parent that starts a grandchild (as torchrun starts its worker) and prints its pid
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); print(c.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    worker = int(proc.stdout.readline())
    _kill_session(proc)
    for _ in range(100):  # the worker is re-parented and reaped by init; give it a moment
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        with open(f"/proc/{worker}/stat") as f:  # a zombie awaiting its reaper is dead too
            assert f.read().split()[2] == "Z", f"worker {worker} survived the kill"
    assert proc.returncode is not None


def test_profile_step_smoke_times_and_ranks_a_training_step():
    proc = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--smoke", "--warmup", "1",
                           "--steps", "2", "--profile-steps", "1", "--top", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "median step" in out and "model TFLOP/s" in out, out
    for region in ("forward", "backward", "optimizer"):
        assert f"  {region}: " in out, out
    assert out.count("\n  aten::") + out.count("\n  autograd") + out.count("\n  _") >= 1, out


def test_activation_memory_smoke_compares_the_recompute_modes(tmp_path):
    """Its rows: one per mode, the memory held falling from none to ffn to full (exact bytes,
    not timings: tests/unit/test_recompute.py says by how much)."""
    out_json = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "benchmarks/activation_memory.py", "--smoke", "--warmup", "1",
                           "--steps", "1", "--json", str(out_json)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["none", "ffn", "full"]
    assert rows[0]["held_ratio"] == 1.0 and rows[0]["held_bytes"] > rows[1]["held_bytes"] > rows[2]["held_bytes"] > 0
    assert all(r["step_ms"] > 0 and r["peak_gib"] is None for r in rows)  # no CUDA peak on a CPU
    assert "recompute  held MiB" in proc.stdout, proc.stdout


def test_e2e_reads_the_loss_curve_of_a_run_cut_off(tmp_path):
    """The lines the trainer prints (as the H100 megablocks run's log had them)."""
    from benchmarks.e2e import evals_in_log

    log = tmp_path / "launch.log"
    log.write_text("device: cuda:0\nstep 100: eval loss 2.3176\n[rank0]: noise\nstep 200: eval loss 1.7808\n")
    assert evals_in_log(log) == [{"step": 100, "eval_loss": 2.3176}, {"step": 200, "eval_loss": 1.7808}]
    assert evals_in_log(tmp_path / "missing.log") == []


@pytest.mark.distributed
def test_checkpoint_io_smoke_saves_and_loads_the_step_state_with_every_variant(tmp_path):
    """benchmarks/checkpoint_io.py --smoke: every variant's row; the state it moved is the
    parameters, Adam's two moments, the buffers and each rank's RNG state (counted here from
    the model alone); warm loads found every page cached, cold loads none; the ratios are to
    torch's row. The benchmark itself fails unless every load restored the saved state bitwise."""
    import torch

    from launcher.config import load_config
    from model.transformer import TransformerLM

    from benchmarks.checkpoint_io import BASE, CASES, WORLD

    proc = subprocess.run([sys.executable, "benchmarks/checkpoint_io.py", "--smoke", "--scratch",
                           str(tmp_path), "--out", str(tmp_path / "out")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "checkpoint_io.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["ours", "ours-trusted", "torch", "torch-nofsync", "dcp"]

    job = load_config(["--config", "configs/cpu_tiny.yaml", *BASE, *CASES["smoke"]])
    with torch.device("meta"):
        model = TransformerLM(job.model, job.moe)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    persistent = set(model.state_dict()) - {n for n, _ in model.named_parameters()}
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n in persistent)
    state = 3 * params + buffers + WORLD * torch.get_rng_state().numel()
    assert all(r["state_bytes"] == state for r in rows.values()), (state, rows["ours"]["state_bytes"])

    cached = (1.0, 0.0) if shutil.which("fincore") else (None, None)  # util-linux's fincore measures it
    torch_row = rows["torch"]
    for name, r in rows.items():
        saves, loads = name != "ours-trusted", name not in ("torch-nofsync",)
        assert (r["save_s"] is not None, r["load_warm_s"] is not None) == (saves, loads), name
        if saves:
            assert r["bytes_written"] >= state
            assert r["save_vs_torch"] == pytest.approx(r["save_s"] / torch_row["save_s"])
            assert r["save_gbps"] == pytest.approx(state / 1e9 / r["save_s"])
        if loads:
            assert (r["resident_warm"], r["resident_cold"]) == cached, name
            assert r["load_cold_vs_torch"] == pytest.approx(r["load_cold_s"] / torch_row["load_cold_s"])
    # ranks 1-3 read rank 0's file as well (the dense weights): more than was written
    assert rows["ours"]["bytes_read"] > rows["ours"]["bytes_written"] > torch_row["bytes_read"] >= state
    text = (tmp_path / "out" / "checkpoint_io.txt").read_text().splitlines()
    assert text[0] == f"$ {report['command']}" and "--smoke" in text[0]
    assert text[2].startswith("load average (1, 5, 15 min) before: ") and "after:" in text[3]
