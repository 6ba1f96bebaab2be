"""The scaling sweep end to end on simulated nodes (launcher.simulate): strong and weak
scaling over 1 and 2 nodes x 1 rank, the CSV, MFU, the plots, and reuse on a second call."""

from __future__ import annotations

import csv
import json

import pytest

from launcher.sweep import main as sweep
from tests.distributed.launch import SMALL, TINY

ARGS = ["--config", TINY, *SMALL, "--train.steps=6", "--train.eval_interval=0",
        "--logging.tensorboard=false"]
PEAK_TFLOPS = 0.05


@pytest.mark.distributed
@pytest.mark.slow
def test_sweep_writes_csv_and_plots_and_reuses_finished_points(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--nodes", "1", "2", "--per-node", "1", "--out", str(out),
            "--peak-tflops", str(PEAK_TFLOPS), "--", *ARGS]
    assert sweep(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("running ...") == 3, printed  # weak 1x1 is strong 1x1's run
    with open(out / "scaling.csv") as f:
        rows = {(r["mode"], int(r["world"])): r for r in csv.DictReader(f)}
    assert sorted(rows) == [("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)]
    # strong: global batch 2 sequences kept (micro 2 -> 1); weak: micro batch 2 kept
    assert [rows["strong", w]["global_batch"] for w in (1, 2)] == ["2", "2"]
    assert [rows["weak", w]["micro_batch_size"] for w in (1, 2)] == ["2", "2"]
    assert rows["weak", 1]["status"] == "same as strong_1x1"
    for (mode, world), r in rows.items():
        summary = json.loads((out / f"{mode}_{world}x1" / "summary.json").read_text()) \
            if r["status"] == "ok" else None
        tps = float(r["train_tokens_per_s"])
        assert tps > 0 and float(r["peak_memory_gib"]) > 0.05
        assert float(r["ideal_speedup"]) == world
        assert float(r["efficiency"]) == pytest.approx(float(r["speedup"]) / world, rel=1e-4)
        if summary:
            assert summary["world_size"] == world and summary["layout"]["dp"] == world
            assert summary["peak_tflops_per_device"] == PEAK_TFLOPS  # the sweep passed it on
            assert float(r["mfu"]) == pytest.approx(
                tps * summary["flops_per_token"] / (world * PEAK_TFLOPS * 1e12), rel=1e-4)
    for mode in ("strong", "weak"):
        png = (out / f"scaling_{mode}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # A second call reuses every finished point (same arguments) and rewrites the outputs.
    assert sweep(argv) == 0
    printed = capsys.readouterr().out
    assert "running ..." not in printed and printed.count("reusing the finished run") == 3
