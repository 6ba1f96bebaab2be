"""Unit tests of trainer.metrics: load statistics, TensorBoard writer, throughput (the heatmap:
test_heatmap.py)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from trainer.metrics import MetricsWriter, Throughput, expert_load_stats


def test_expert_load_stats_hand_computed():
    counts = torch.tensor([[4, 0, 0, 0], [1, 1, 1, 1]])
    entropy = torch.tensor([0.0, math.log(4)])
    s = expert_load_stats(counts, entropy)
    assert s["moe/layer0/max_tokens_per_expert"] == 4.0
    assert s["moe/layer0/mean_tokens_per_expert"] == 1.0
    assert s["moe/layer0/max_over_mean"] == 4.0
    assert s["moe/layer0/busiest_expert_fraction"] == 1.0
    assert s["moe/layer1/max_tokens_per_expert"] == 1.0
    assert s["moe/layer1/mean_tokens_per_expert"] == 1.0
    assert s["moe/layer1/max_over_mean"] == 1.0
    assert s["moe/layer1/busiest_expert_fraction"] == 0.25
    assert s["moe/layer0/router_entropy"] == 0.0
    assert s["moe/layer1/router_entropy"] == pytest.approx(math.log(4))
    assert s["moe/max_over_mean"] == pytest.approx(2.5)
    assert s["moe/busiest_expert_fraction"] == pytest.approx(0.625)
    assert s["moe/router_entropy"] == pytest.approx(math.log(4) / 2)
    assert all(isinstance(v, float) for v in s.values())


def test_expert_load_stats_without_entropy_has_no_entropy_keys():
    s = expert_load_stats(torch.tensor([[3.0, 1.0]]))
    assert not any("entropy" in k for k in s)
    assert s["moe/layer0/max_over_mean"] == pytest.approx(1.5)
    assert s["moe/busiest_expert_fraction"] == pytest.approx(0.75)


def test_zero_token_layer_gives_zeros_not_nan():
    s = expert_load_stats(torch.tensor([[0, 0, 0], [2, 1, 0]]), torch.tensor([0.0, 0.5]))
    assert all(math.isfinite(v) for v in s.values())
    assert s["moe/layer0/max_over_mean"] == 0.0
    assert s["moe/layer0/busiest_expert_fraction"] == 0.0
    assert s["moe/layer1/max_over_mean"] == pytest.approx(2.0)
    assert s["moe/max_over_mean"] == pytest.approx(1.0)


def test_empty_counts_and_bad_inputs():
    assert expert_load_stats(torch.zeros(0, 8)) == {}
    with pytest.raises(ValueError):
        expert_load_stats(torch.ones(4))
    with pytest.raises(ValueError):
        expert_load_stats(torch.ones(2, 4), torch.ones(3))


def test_metrics_writer_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    img = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with MetricsWriter(tmp_path, enabled=True) as w:
        w.scalars(1, {"train/loss": 2.5, "moe/max_over_mean": 1.25})
        w.scalars(2, {"train/loss": 2.0})
        w.image("moe/image", img, step=2)
        w.text("config", "hello", step=0)
        w.flush()
    log_dir = tmp_path / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in log_dir.iterdir())
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "moe/image" in tags["images"]
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, pytest.approx(2.5)), (2, pytest.approx(2.0))]
    assert acc.Scalars("moe/max_over_mean")[0].value == pytest.approx(1.25)
    image = acc.Images("moe/image")[0]
    assert (image.step, image.width, image.height) == (2, img.shape[2], img.shape[1])


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path, enabled=False)
    w.scalars(1, {"train/loss": 1.0})
    w.image("img", torch.zeros(3, 4, 4, dtype=torch.uint8), step=1)
    w.text("t", "x", step=1)
    w.flush()
    w.close()
    assert list(tmp_path.iterdir()) == []


def test_throughput_rate_positive_and_windowed():
    t = Throughput()
    t.update(1000)
    t.update(500)
    time.sleep(0.01)
    r = t.rate()
    assert math.isfinite(r) and r > 0
    assert r < 1500 / 0.01 * 1.01  # at most tokens / (slept time)
    # The window resets: with no new tokens the next rate is zero.
    assert t.rate() == 0.0


def test_throughput_leaves_out_the_excluded_time():
    """Evaluation and checkpoints run inside excluded(): a 0.3 s evaluation must not show up
    as a collapse of the next window's training tokens/s."""
    t = Throughput()
    t.update(1000)
    with t.excluded():
        time.sleep(0.3)
    assert t.rate() > 1000 / 0.1
    t.update(1000)
    time.sleep(0.05)
    assert t.rate() < 1000 / 0.05  # the exclusion went with its window


def test_text_table_formats_scales_and_marks_missing_values():
    from trainer.metrics import text_table

    rows = [{"name": "a", "bytes": 2**31, "x": 0.5, "note": "ok"}, {"name": "bb", "x": None}]
    columns = [("name", "name", "{}", 4), ("GiB", "bytes", "{:.1f}", 6, 2**-30),
               ("x", "x", "{:.2f}", 6), ("  note", "note", "  {}", 0)]
    assert text_table(rows, columns).splitlines() == [
        "name   GiB     x  note",
        "a      2.0  0.50  ok",
        "bb       -     -",
    ]
