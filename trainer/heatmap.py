"""The expert-load heatmap: a layers x experts picture of where the router sends tokens.

Each cell is one expert's token-slots divided by its layer's mean (``x mean load``), so 1.0
means balanced whatever E is. The colour map is diverging (RdBu_r) on a log scale centred on
1.0: balance is white, overload red, underload blue, and 2x and 0.5x are equally saturated
because imbalance is a ratio. The scale is fixed at [1/LIMIT, LIMIT] so colours compare across
steps and runs; values beyond it take the end colours (the colour bar's arrows).

Drawn with matplotlib's Figure and Agg canvas directly (never pyplot): no display, no global
figure state, and the same RGB pixels go to TensorBoard and to the PNG files.
Shape suffixes: ``L`` = MoE layers, ``E`` = experts per layer, ``C`` = RGB channels,
``H``/``W`` = image height/width.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trainer.metrics import MetricsWriter, check_counts

LIMIT = 4.0  # colour scale [1/4, 4] x mean load
CMAP = "RdBu_r"
DPI = 100
CELL_IN = (0.55, 0.42)  # preferred cell width, height (inches) while the figure fits
AXES_MAX_IN = (15.0, 9.0)  # the grid never grows past this (1500 x 900 px at DPI)
AXES_MIN_IN = (3.0, 0.8)
MARGIN_IN = (2.6, 2.0)  # around the grid: labels, the max column, title and colour bar
LABEL_IN = (0.35, 0.17)  # room one tick label needs along x (3 digits), along y (one line)
ANNOTATE_MIN_CELL_IN = (0.4, 0.22)  # cells at least this big carry their value as text


def _tick_step(num_cells: int, length_in: float, label_in: float) -> int:
    """Label every step-th cell, the smallest power of two that leaves ``label_in`` inches per
    label on an axis ``length_in`` long (experts come in powers of two, so the labels fall on
    expert-parallel shard boundaries)."""
    step = 1
    while step < num_cells and length_in / num_cells * step < label_in:
        step *= 2
    return step


def _axes_size(num_layers: int, num_experts: int) -> tuple[float, float]:
    """The grid's (width, height) in inches: CELL_IN per cell, clamped to the min/max."""
    w = min(max(num_experts * CELL_IN[0], AXES_MIN_IN[0]), AXES_MAX_IN[0])
    h = min(max(num_layers * CELL_IN[1], AXES_MIN_IN[1]), AXES_MAX_IN[1])
    return w, h


def load_ratio(counts_LE: torch.Tensor) -> np.ndarray:
    """Each expert's load over its layer's mean (L, E), float64; NaN for a layer with no tokens."""
    counts = check_counts(counts_LE).numpy()
    mean_L1 = counts.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean_L1 > 0, counts / mean_L1, np.nan)


def heatmap_figure(counts_LE: torch.Tensor, step: int, window_steps: int,
                   block_ids: Sequence[int] | None = None):
    """The matplotlib Figure of the heatmap (not yet drawn). ``window_steps`` is how many steps
    the counts sum (the log window ending at ``step``); ``block_ids[i]`` is the model block of
    MoE layer i, shown beside the layer index when it differs from it."""
    import matplotlib
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    ratio_LE = load_ratio(counts_LE)
    num_layers, num_experts = ratio_LE.shape
    if num_layers == 0 or num_experts == 0:
        raise ValueError(f"counts_LE has no cells to draw (shape {tuple(ratio_LE.shape)})")
    if block_ids is not None and len(block_ids) != num_layers:
        raise ValueError(f"block_ids has {len(block_ids)} entries for {num_layers} MoE layers")
    if window_steps < 1 or step < window_steps:
        raise ValueError(f"window_steps ({window_steps}) must be in [1, step ({step})]")

    axes_w, axes_h = _axes_size(num_layers, num_experts)
    fig = Figure(figsize=(axes_w + MARGIN_IN[0], axes_h + MARGIN_IN[1]), dpi=DPI,
                 layout="constrained")
    ax = fig.add_subplot()
    norm = LogNorm(vmin=1 / LIMIT, vmax=LIMIT)
    # Clipping keeps zeros (idle experts) on the scale: LogNorm would mask them as invalid.
    shown_LE = np.ma.masked_invalid(np.clip(ratio_LE, 1 / LIMIT, LIMIT))
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad="0.8")  # grey: a layer with no tokens
    im = ax.imshow(shown_LE, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")

    y_step = _label_axes(ax, num_layers, num_experts, (axes_w, axes_h), block_ids)
    cell_w, cell_h = axes_w / num_experts, axes_h / num_layers
    if cell_w >= ANNOTATE_MIN_CELL_IN[0] and cell_h >= ANNOTATE_MIN_CELL_IN[1]:
        _annotate(ax, ratio_LE, cmap, norm)
    _max_column(ax, ratio_LE, y_step)

    first = step - window_steps + 1
    steps = f"step {step}" if window_steps == 1 else f"steps {first}-{step}"
    ax.set_title(f"Expert load at step {step} (tokens routed in {steps})\n"
                 f"{num_layers} MoE layers x {num_experts} experts; {_busiest(ratio_LE)}",
                 fontsize=11)
    _colour_bar(fig, im, ax, axes_w, axes_h)
    return fig


def _label_axes(ax, num_layers: int, num_experts: int, axes_in: tuple[float, float],
                block_ids: Sequence[int] | None) -> int:
    """Axis names, thinned tick labels and cell separators; returns the layer label step."""
    axes_w, axes_h = axes_in
    x_step = _tick_step(num_experts, axes_w, LABEL_IN[0])
    y_step = _tick_step(num_layers, axes_h, LABEL_IN[1])
    ax.set_xticks(range(0, num_experts, x_step))
    ax.set_yticks(range(0, num_layers, y_step))
    if block_ids is not None and list(block_ids) != list(range(num_layers)):
        ax.set_yticklabels([f"{i} (block {block_ids[i]})" for i in range(0, num_layers, y_step)])
        ax.set_ylabel("MoE layer (model block)")
    else:
        ax.set_ylabel("MoE layer")
    ax.set_xlabel("expert id")
    if axes_w / num_experts >= 0.12 and axes_h / num_layers >= 0.12:
        # Grey lines between cells, where they leave room for the colour.
        ax.set_xticks(np.arange(-0.5, num_experts, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, num_layers, 1), minor=True)
        ax.grid(which="minor", color="0.6", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    elif x_step > 1:  # an unlabelled tick on every expert, to count from the labelled ones
        ax.set_xticks(range(num_experts), minor=True)
    return y_step


def _colour_bar(fig, im, ax, axes_w: float, axes_h: float) -> None:
    """Horizontal, below the grid (it fits short wide grids too); the arrows at its ends are
    the clamped values beyond [1/LIMIT, LIMIT]."""
    bar = fig.colorbar(im, ax=ax, orientation="horizontal", extend="both", location="bottom",
                       fraction=0.9 / (axes_h + MARGIN_IN[1]), aspect=40,
                       shrink=min(1.0, 6.0 / axes_w))
    ticks = [LIMIT ** (k / 2) for k in range(-2, 3)]
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.minorticks_off()
    bar.set_label("x mean load (log scale; blue = under, white = balanced, red = over; "
                  "grey = no tokens)")


def _busiest(ratio_LE: np.ndarray) -> str:
    """Where the worst overload is, the cell a reader should find first."""
    if np.isnan(ratio_LE).all():
        return "no tokens routed"
    layer, expert = np.unravel_index(np.nanargmax(ratio_LE), ratio_LE.shape)
    return f"busiest: layer {layer} expert {expert} at {ratio_LE[layer, expert]:.2f}x mean"


def _annotate(ax, ratio_LE: np.ndarray, cmap, norm) -> None:
    """Each cell's value as text, dark on light cells and white on saturated ones."""
    for (layer, expert), value in np.ndenumerate(ratio_LE):
        if math.isnan(value):
            continue
        r, g, b, _ = cmap(norm(min(max(value, 1 / LIMIT), LIMIT)))
        light = 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45
        ax.text(expert, layer, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="black" if light else "white")


def _max_column(ax, ratio_LE: np.ndarray, y_step: int) -> None:
    """Each labelled layer's busiest expert (max / mean) as a right-hand axis."""
    right = ax.secondary_yaxis("right")
    rows = range(0, ratio_LE.shape[0], y_step)
    right.set_yticks(list(rows))
    right.set_yticklabels([("no tokens" if np.isnan(ratio_LE[i]).all()
                            else f"max {np.nanmax(ratio_LE[i]):.2f}") for i in rows])
    right.tick_params(length=0)


def render_load_heatmap(counts_LE: torch.Tensor, step: int, window_steps: int,
                        block_ids: Sequence[int] | None = None) -> torch.Tensor:
    """The heatmap as a uint8 RGB image (3, H, W), for ``MetricsWriter.image``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = heatmap_figure(counts_LE, step, window_steps, block_ids)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba_HWC = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba_HWC[..., :3].copy()).permute(2, 0, 1).contiguous()


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (a browser refreshing latest.png) see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_heatmap_png(img_CHW: torch.Tensor, run_dir: str | Path, step: int) -> Path:
    """Write the image as ``<run_dir>/expert_load/step_NNNNNNNN.png`` and ``latest.png``;
    returns the step file's path."""
    from PIL import Image

    out_dir = Path(run_dir) / "expert_load"
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(img_CHW.permute(1, 2, 0).numpy()).save(buf, format="png")  # RGB, no alpha
    path = out_dir / f"step_{step:08d}.png"
    _write_atomic(path, buf.getvalue())
    _write_atomic(out_dir / "latest.png", buf.getvalue())
    return path


def write_load_heatmap(metrics: MetricsWriter, run_dir: str | Path, counts_LE: torch.Tensor,
                       step: int, window_steps: int, block_ids: Sequence[int] | None = None) -> Path:
    """Render once; send it to TensorBoard (``moe/expert_load``) and to the PNG files.
    Call it on rank 0 only: the other ranks would draw a picture nobody sees."""
    img_CHW = render_load_heatmap(counts_LE, step, window_steps, block_ids)
    metrics.image("moe/expert_load", img_CHW, step)
    return save_heatmap_png(img_CHW, run_dir, step)
