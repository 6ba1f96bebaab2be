"""Training metrics: MoE expert-load statistics, TensorBoard output, throughput.

The layers x experts load heatmap is drawn in trainer/heatmap.py.

Nothing here talks to torch.distributed: the trainer reduces counts across ranks first and
only rank 0 writes (other ranks get a disabled ``MetricsWriter`` whose methods are no-ops).
Shape suffixes: ``L`` = MoE layers, ``E`` = experts per layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from checkpoint.errors import write_failure


def check_counts(counts_LE: torch.Tensor) -> torch.Tensor:
    """The counts as float64 on the CPU, after checking they are a 2-D non-negative grid."""
    if counts_LE.ndim != 2:
        raise ValueError(f"counts_LE must be 2-D (layers, experts), got shape {tuple(counts_LE.shape)}")
    counts = counts_LE.detach().to("cpu", torch.float64)
    if bool((counts < 0).any()):
        raise ValueError("counts_LE must be non-negative token counts")
    return counts


def expert_load_stats(counts_LE: torch.Tensor, entropy_L: torch.Tensor | None = None,
                      dropped_L: torch.Tensor | None = None) -> dict[str, float]:
    """Flat TensorBoard scalars describing how evenly each MoE layer spreads its tokens.

    ``max_over_mean`` is the standard load-imbalance factor (1.0 is perfect, E means one expert
    takes everything): with capacity-based dispatch it says how much capacity headroom a layer
    needs. ``busiest_expert_fraction`` is the same information as a share, easier to compare
    across different E. A layer with zero tokens reports 0 for both rather than NaN, so one
    idle step does not poison TensorBoard's smoothing. ``entropy_L`` (mean per-token router
    entropy in nats, computed by the model) is passed through per layer and averaged; low values
    flag routers that have collapsed onto few experts. ``dropped_L`` (token-slots dropped for
    lack of capacity) gives ``dropped_slots`` and ``dropped_fraction`` (of the layer's slots)
    per layer and in total. Returns {} when there are no MoE layers.
    """
    if counts_LE.numel() == 0:
        return {}
    counts = check_counts(counts_LE)
    num_layers, num_experts = counts.shape
    total_L = counts.sum(dim=1)
    max_L = counts.max(dim=1).values
    mean_L = total_L / num_experts
    has_tokens_L = total_L > 0
    max_over_mean_L = torch.where(has_tokens_L, max_L / mean_L.clamp_min(1e-30), torch.zeros_like(max_L))
    busiest_L = torch.where(has_tokens_L, max_L / total_L.clamp_min(1e-30), torch.zeros_like(max_L))

    entropies: list[float] | None = None
    if entropy_L is not None:
        entropies = [float(x) for x in entropy_L.detach().to("cpu", torch.float64).reshape(-1)]
        if len(entropies) != num_layers:
            raise ValueError(f"entropy_L has {len(entropies)} values for {num_layers} MoE layers")

    out: dict[str, float] = {}
    for layer in range(num_layers):
        prefix = f"moe/layer{layer}"
        out[f"{prefix}/max_tokens_per_expert"] = float(max_L[layer])
        out[f"{prefix}/mean_tokens_per_expert"] = float(mean_L[layer])
        out[f"{prefix}/max_over_mean"] = float(max_over_mean_L[layer])
        out[f"{prefix}/busiest_expert_fraction"] = float(busiest_L[layer])
        if entropies is not None:
            out[f"{prefix}/router_entropy"] = entropies[layer]
    out["moe/max_over_mean"] = float(max_over_mean_L.mean())
    out["moe/busiest_expert_fraction"] = float(busiest_L.mean())
    if entropies is not None:
        out["moe/router_entropy"] = sum(entropies) / num_layers
    if dropped_L is not None:
        dropped = dropped_L.detach().to("cpu", torch.float64).reshape(-1)
        if dropped.numel() != num_layers:
            raise ValueError(f"dropped_L has {dropped.numel()} values for {num_layers} MoE layers")
        fraction_L = torch.where(has_tokens_L, dropped / total_L.clamp_min(1e-30), torch.zeros_like(dropped))
        for layer in range(num_layers):
            out[f"moe/layer{layer}/dropped_slots"] = float(dropped[layer])
            out[f"moe/layer{layer}/dropped_fraction"] = float(fraction_L[layer])
        out["moe/dropped_fraction"] = float(dropped.sum() / total_L.sum().clamp_min(1e-30))
    return out


class MetricsWriter:
    """TensorBoard writer that only exists where it should, and never stops training.

    Every rank can call it unconditionally; pass ``enabled=(rank == 0)`` so one process writes.
    The ``SummaryWriter`` (and the tensorboard import) is created on first use, so disabled
    ranks and runs that never log pay nothing and leave no empty event files behind.
    Events go to ``<run_dir>/tensorboard``. A failure to write (a full disk, a run dir turned
    read-only, a broken writer thread) is reported once, naming the path and the cause, and
    turns the writer off: the checkpoints, not the event files, are what a run must keep.
    """

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.log_dir = Path(run_dir) / "tensorboard"
        self.enabled = bool(enabled)
        self.failure: str | None = None
        self._writer: Any = None

    @contextmanager
    def guarded(self, what: str):
        """Run a write of `what`; if it fails, say so once and turn the writer off."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - metrics must not end a run
            self.enabled = False
            self.failure = f"{what}: {write_failure(self.log_dir, exc)}"
            print(f"warning: {self.failure}; TensorBoard and heatmaps are off for the rest of "
                  "the run", flush=True)
            self._abandon()

    def _get(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_threads()
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with self.guarded("writing TensorBoard scalars"):
            writer = self._get()
            for tag, value in values.items():
                writer.add_scalar(tag, float(value), global_step=step)

    def image(self, tag: str, img_CHW: torch.Tensor, step: int) -> None:
        if not self.enabled:
            return
        with self.guarded("writing a TensorBoard image"):
            self._get().add_image(tag, img_CHW, global_step=step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        if not self.enabled:
            return
        with self.guarded("writing TensorBoard text"):
            self._get().add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            with self.guarded("flushing TensorBoard events"):
                self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            with self.guarded("closing TensorBoard events"):
                self._writer.close()
            self._writer = None

    def _abandon(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - it failed already; its error was reported
                pass

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread re-raises its write error (to the next write, which
    MetricsWriter reports) and also prints it as an uncaught thread exception: a traceback
    for a failure already said in one line. Keep the default hook for every other thread."""
    if getattr(threading.excepthook, "_moe_quiet", False):
        return
    previous = threading.excepthook

    def hook(args):
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook._moe_quiet = True
    threading.excepthook = hook


class StepTimer:
    """Wall time of the training steps alone (no evaluation, logging or checkpoints), for the
    steady-state throughput a scaling study compares. The first `warmup_fraction` of the
    steps (at least one when there are two or more) are left out: they pay for allocator
    growth, autotuning and lazy initialisation."""

    def __init__(self, warmup_fraction: float = 0.1) -> None:
        self.warmup_fraction, self.durations = warmup_fraction, []

    def add(self, seconds: float) -> None:
        self.durations.append(seconds)

    def steady(self) -> tuple[int, float]:
        """(steps, seconds) after the warm-up."""
        n = len(self.durations)
        skip = max(1, int(n * self.warmup_fraction)) if n > 1 else 0
        return n - skip, sum(self.durations[skip:])


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    """FLOP/s of one device for MFU: logging.peak_tflops if set, else a known GPU's dense
    bf16 peak, else None (no MFU: a CPU has no agreed peak)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        from model.flops import known_peak_flops

        return known_peak_flops(torch.cuda.get_device_name(device))
    return None


def peak_memory(device: torch.device) -> tuple[int, str]:
    """This process's peak memory in bytes and what it measures: on CUDA the most memory
    torch's allocator held for tensors; on CPU the peak resident set (which includes the
    Python interpreter and torch's libraries, a few hundred MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


class Throughput:
    """Tokens per second of training over the window since the previous ``rate()`` call (or
    construction), with the time spent inside ``excluded()`` (evaluation, checkpoints) left out.

    Windowed rather than cumulative so the logged value reflects current speed, not one
    diluted by start-up and compilation time.
    """

    def __init__(self) -> None:
        self._tokens = 0
        self._start = time.perf_counter()
        self._excluded = 0.0

    def update(self, num_tokens: int) -> None:
        self._tokens += int(num_tokens)

    @contextmanager
    def excluded(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - began

    def rate(self) -> float:
        now = time.perf_counter()
        elapsed = now - self._start - self._excluded
        tokens, self._tokens, self._start, self._excluded = self._tokens, 0, now, 0.0
        return tokens / elapsed if elapsed > 0 else 0.0


def text_table(rows: list[Mapping[str, Any]], columns: list[tuple]) -> str:
    """A fixed-width table for reports (the sweep, the benchmarks). `columns` holds
    (header, key, format, width) or (header, key, format, width, scale); a missing or None
    value prints as '-' (as nothing in a width-0 column, a free-text tail such as a status).
    The first column is left-aligned, the others right-aligned."""
    def cell(row, key, fmt, width, scale=1.0):
        value = row.get(key)
        if value is None:
            return "-" if width else ""
        return fmt.format(value * scale) if isinstance(value, (int, float)) and scale != 1.0 else fmt.format(value)

    def line(values):
        return "".join(v.ljust(c[3]) if i == 0 else v.rjust(c[3])
                       for i, (v, c) in enumerate(zip(values, columns)))

    out = [line([c[0] for c in columns])]
    out += [line([cell(r, c[1], c[2], c[3], *c[4:]) for c in columns]) for r in rows]
    return "\n".join(out)
