"""The MoE layer benchmark's harness on CPU (benchmarks/moe_layer.py --smoke): every backend
row present and consistent, the routings as skewed as they say. No speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.moe_layer import routed_inputs

ROOT = Path(__file__).resolve().parents[2]


def _load(routing: str, D=64, E=8, K=2, T=4096) -> torch.Tensor:
    x, w = routed_inputs(D, E, T, routing, "cpu", torch.float32)
    idx = (x @ w.T).softmax(-1).topk(K, -1).indices
    counts = torch.bincount(idx.flatten(), minlength=E).float()
    return counts.max() / counts.mean()


def test_zipf_routing_is_skewed_and_uniform_is_not():
    assert _load("uniform") < 1.3
    assert _load("zipf") > 2.5  # Zipf(1) over 8 experts: the first share is 2.94 x the mean


def test_smoke_run_reports_every_backend(tmp_path):
    out = tmp_path / "layer.json"
    proc = subprocess.run([sys.executable, "benchmarks/moe_layer.py", "--smoke", "--shape",
                           "tiny-fine", "--iters", "1", "--warmup", "0", "--out", str(out),
                           "--profile", "native"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["shape"], r["routing"]) for r in report["results"]] == [
        ("tiny-fine", r) for r in ("uniform", "zipf")]
    for res in report["results"]:
        rows = {r["backend"]: r for r in res["rows"]}
        assert list(rows) == ["dense", "native", "native-compiled", "native-loop", "megablocks",
                              "deepspeed-cf1", "deepspeed-cf2"]
        assert rows["megablocks"]["skipped"] == "megablocks needs CUDA"
        assert rows["dense"]["vs_dense"] == 1.0
        for name, r in rows.items():
            if name == "megablocks":
                continue
            assert r["tflops"] * 1e12 * r["time_ms"] / 1e3 == pytest.approx(r["flops"])
            if name != "dense":
                assert r["vs_dense"] == r["tflops"] / rows["dense"]["tflops"]
        assert rows["native"]["dropped_fraction"] == 0.0
        # The forward costs are counted on CPU too: the native layer waits on nothing, the loop
        # reference once (its row counts); the native layer keeps less than the loop for backward.
        assert (rows["native"]["sync_ops"], rows["native-loop"]["sync_ops"]) == (0, 1)
        assert 0 < rows["native"]["saved_mib"] < rows["native-loop"]["saved_mib"]
        # fusing the elementwise math changes neither
        assert rows["native-compiled"]["sync_ops"] == 0
        assert rows["native-compiled"]["saved_mib"] == rows["native"]["saved_mib"]
        # --profile native: where its step goes, for native only.
        ops = rows["native"]["profile"]
        assert ops and all(0 < op["share"] <= 1 and op["ms_per_step"] > 0 for op in ops)
        assert all("profile" not in r for name, r in rows.items() if name != "native")
        if res["routing"] == "zipf":  # capacity factor 1 cannot hold a skewed load
            assert rows["deepspeed-cf1"]["dropped_fraction"] > 0.05
    assert "native" in proc.stdout and "wrote" in proc.stdout
