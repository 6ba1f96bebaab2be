"""The end-to-end benchmark's harness on CPU (benchmarks/e2e.py --smoke): a torchrun run of
the native backend, its summary read back; megablocks skipped, with the reason, without CUDA.
No speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed.launch import ROOT, _env


@pytest.mark.distributed
@pytest.mark.slow
def test_e2e_smoke_runs_native_and_reads_its_summary(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/e2e.py", "--smoke", "--steps", "4",
                           "--backend", "native", "megablocks",
                           "--peak-tflops", "0.1", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["backend"]: r for r in json.loads((tmp_path / "e2e.json").read_text())["rows"]}
    assert rows["megablocks"]["status"] == "skipped: megablocks needs CUDA"
    r = rows["native"]  # (the deepspeed backend trains through the same path: test_layouts.py)
    summary = json.loads((tmp_path / "e2e_native" / "summary.json").read_text())
    assert r["status"] == "ok" and r["train_tokens_per_s"] == summary["train_tokens_per_s"] > 0
    assert r["mfu"] == pytest.approx(r["train_tokens_per_s"] * r["flops_per_token"] / 0.1e12)
    assert r["peak_memory_bytes"] > 0 and r["final_eval_loss"] > 0
    assert "native" in proc.stdout and "skipped: megablocks needs CUDA" in proc.stdout
