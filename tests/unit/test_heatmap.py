"""Unit tests of trainer.heatmap: the picture's size, that each cell's value reaches its pixels,
the colour bar, readable ticks at large E, and the PNG files beside the run."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import trainer.heatmap as heatmap
from trainer.heatmap import heatmap_figure, render_load_heatmap, save_heatmap_png, write_load_heatmap
from trainer.metrics import MetricsWriter


def _draw(counts_LE, step=50, window_steps=10, block_ids=None):
    """The figure and its pixels (H, W, 3), as render_load_heatmap produces them."""
    fig = heatmap_figure(torch.as_tensor(counts_LE), step, window_steps, block_ids)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return fig, np.asarray(canvas.buffer_rgba())[..., :3].astype(int)


def _pixel(fig, rgb_HW3, ax, x, y):
    """The pixel at data coordinates (x, y) of `ax` (display y counts from the bottom)."""
    px, py = ax.transData.transform((x, y))
    return rgb_HW3[rgb_HW3.shape[0] - 1 - int(py), int(px)]


def _cell(fig, rgb_HW3, layer, expert):
    # Off the centre, where a cell's value is written as text, and clear of the grid lines.
    return _pixel(fig, rgb_HW3, fig.axes[0], expert - 0.3, layer - 0.3)


def _is_white(rgb):
    return min(rgb) > 230


def _is_red(rgb):
    return rgb[0] > rgb[2] + 50 and rgb[0] > rgb[1] + 50


def _is_blue(rgb):
    return rgb[2] > rgb[0] + 50


def test_render_is_the_figure_as_uint8_rgb_at_its_size():
    counts = torch.tensor([[4, 0, 0, 0], [1, 1, 1, 1]])
    fig, rgb = _draw(counts)
    img = render_load_heatmap(counts, 50, 10)
    w_in, h_in = fig.get_size_inches()
    assert img.dtype == torch.uint8
    assert img.shape == (3, round(h_in * fig.dpi), round(w_in * fig.dpi))
    assert torch.equal(img, torch.from_numpy(rgb.astype(np.uint8)).permute(2, 0, 1))


def test_figure_grows_with_the_grid_within_limits():
    def size(L, E):
        return render_load_heatmap(torch.ones(L, E), 1, 1).shape[1:]

    small, wide, big, huge = size(4, 8), size(2, 256), size(16, 64), size(128, 512)
    assert small[1] >= 600 and small[0] >= 300  # large enough to read
    assert small[1] < big[1] and wide[0] < big[0]
    (max_w, max_h), (pad_w, pad_h) = heatmap.AXES_MAX_IN, heatmap.MARGIN_IN
    limit = (round((max_h + pad_h) * heatmap.DPI), round((max_w + pad_w) * heatmap.DPI))
    assert huge == limit and wide[1] == limit[1]


def test_balanced_one_hot_and_idle_layers_colour_their_cells():
    # Layer 0 balanced, layer 1 all on expert 2, layer 2 no tokens, layer 3 twice and half.
    counts = torch.tensor([[5, 5, 5, 5], [0, 0, 20, 0], [0, 0, 0, 0], [8, 2, 4, 2]])
    fig, rgb = _draw(counts)
    for expert in range(4):
        assert _is_white(_cell(fig, rgb, 0, expert)), expert
    assert _is_red(_cell(fig, rgb, 1, 2))
    for expert in (0, 1, 3):
        assert _is_blue(_cell(fig, rgb, 1, expert)), expert
    for expert in range(4):  # neutral grey, neither balanced-white nor a load colour
        grey = _cell(fig, rgb, 2, expert)
        assert max(grey) - min(grey) < 10 and 150 < grey[0] < 225, grey
    # 2x and 0.5x mean (8 and 2 of mean 4) are equally far from balance, on opposite sides.
    over, under, even = _cell(fig, rgb, 3, 0), _cell(fig, rgb, 3, 1), _cell(fig, rgb, 3, 2)
    assert _is_white(even) and _is_red(over) and _is_blue(under)
    far_over, far_under = (int(np.abs(c - even).sum()) for c in (over, under))
    assert abs(far_over - far_under) < 0.15 * far_over, (far_over, far_under)


def test_cells_carry_their_value_as_text_only_when_there_is_room():
    counts = torch.tensor([[8, 2, 4, 2], [0, 0, 0, 0]])
    fig, _ = _draw(counts)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0.50", "0.50", "1.00", "2.00"]
    fig, _ = _draw(torch.ones(16, 64))
    assert len(fig.axes[0].texts) == 0


def test_colour_bar_runs_from_under_through_balanced_to_over():
    fig, rgb = _draw(torch.tensor([[4, 0, 0, 0]]))
    (bar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert "x mean load" in bar.get_xlabel()
    lo, hi = bar.get_xlim()
    assert lo == pytest.approx(1 / heatmap.LIMIT) and hi == pytest.approx(heatmap.LIMIT)
    assert _is_blue(_pixel(fig, rgb, bar, lo * 1.05, 0.5))
    assert _is_white(_pixel(fig, rgb, bar, 1.0, 0.5))
    assert _is_red(_pixel(fig, rgb, bar, hi / 1.05, 0.5))


def test_title_names_the_step_the_window_and_the_busiest_expert():
    fig, _ = _draw(torch.tensor([[1, 1, 1, 1], [1, 1, 1, 5]]), step=50, window_steps=10)
    title = fig.axes[0].get_title()
    assert "step 50" in title and "steps 41-50" in title
    assert "layer 1 expert 3 at 2.50x mean" in title
    fig, _ = _draw(torch.ones(1, 2), step=7, window_steps=1)
    assert "in step 7)" in fig.axes[0].get_title()


def test_layer_labels_name_the_model_block_when_it_differs():
    fig, _ = _draw(torch.ones(2, 4), block_ids=[1, 3])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 (block 1)", "1 (block 3)"]
    assert ax.get_ylabel() == "MoE layer (model block)"
    fig, _ = _draw(torch.ones(2, 4), block_ids=[0, 1])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1"]
    assert fig.axes[0].get_xlabel() == "expert id"


@pytest.mark.parametrize("shape", [(4, 8), (16, 64), (2, 256), (64, 256)])
def test_tick_labels_never_overlap_and_thin_in_powers_of_two(shape):
    num_layers, num_experts = shape
    fig, _ = _draw(torch.ones(shape))
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    for labels, n in ((ax.get_xticklabels(), num_experts), (ax.get_yticklabels(), num_layers)):
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert all(not a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
        values = [int(t.get_text().split()[0]) for t in labels]
        step = values[1] - values[0] if len(values) > 1 else 1
        assert values == list(range(0, n, step)) and step & (step - 1) == 0
        assert len(values) >= min(n, 16)  # thinned only as far as needed
    if shape == (4, 8):
        assert len(ax.get_xticklabels()) == 8


def test_bad_input_names_the_values():
    with pytest.raises(ValueError, match=r"block_ids has 3 entries for 2 MoE layers"):
        heatmap_figure(torch.ones(2, 4), 5, 1, [0, 1, 2])
    with pytest.raises(ValueError, match=r"window_steps \(6\) must be in \[1, step \(5\)\]"):
        heatmap_figure(torch.ones(2, 4), 5, 6)
    with pytest.raises(ValueError, match=r"no cells"):
        heatmap_figure(torch.ones(0, 4), 5, 1)
    with pytest.raises(ValueError, match=r"non-negative"):
        heatmap_figure(-torch.ones(2, 4), 5, 1)


def _read_png(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_png_files_per_step_and_latest(tmp_path):
    a = render_load_heatmap(torch.tensor([[4, 0, 0, 0]]), 50, 10)
    b = render_load_heatmap(torch.tensor([[1, 1, 1, 1]]), 60, 10)
    assert save_heatmap_png(a, tmp_path, 50) == tmp_path / "expert_load" / "step_00000050.png"
    save_heatmap_png(b, tmp_path, 60)
    out = tmp_path / "expert_load"
    assert sorted(p.name for p in out.iterdir()) == ["latest.png", "step_00000050.png",
                                                     "step_00000060.png"]
    assert torch.equal(_read_png(out / "step_00000050.png"), a)
    assert torch.equal(_read_png(out / "step_00000060.png"), b)
    assert torch.equal(_read_png(out / "latest.png"), b)


def test_latest_png_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    a = render_load_heatmap(torch.tensor([[4, 0, 0, 0]]), 50, 10)
    save_heatmap_png(a, tmp_path, 50)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(heatmap.os, "replace", fail)
    with pytest.raises(OSError):
        save_heatmap_png(torch.zeros_like(a), tmp_path, 60)
    assert torch.equal(_read_png(tmp_path / "expert_load" / "latest.png"), a)


def test_write_load_heatmap_sends_one_image_to_tensorboard_and_png(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    counts = torch.tensor([[3, 1], [2, 2]])
    with MetricsWriter(tmp_path, enabled=True) as w:
        path = write_load_heatmap(w, tmp_path, counts, 20, 10, [1, 3])
    png = _read_png(path)
    assert torch.equal(png, render_load_heatmap(counts, 20, 10, [1, 3]))
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("moe/expert_load")
    assert (event.step, event.width, event.height) == (20, png.shape[2], png.shape[1])
    decoded = np.array(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert torch.equal(torch.from_numpy(decoded).permute(2, 0, 1), png)
