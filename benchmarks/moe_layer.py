"""One MoE layer, forward + backward, every backend side by side against a dense reference.

    python benchmarks/moe_layer.py                  # GPU: both shapes x both routings, bf16
    python benchmarks/moe_layer.py --shape fine-grained --routing zipf --backend native megablocks
    python benchmarks/moe_layer.py --smoke          # CPU: tiny shapes, fp32 (checks the harness)
    python benchmarks/moe_layer.py --profile native # also: where native's step time goes, by op

Shapes (issue 6): mixtral-like (hidden 4096, expert ffn 14336, 8 experts, top-2, 8192 tokens)
and fine-grained (2048, 1024, 64 experts, top-8, 16384 tokens). Routings: `uniform` (random
router, near-even load) and `zipf` (expert e gets a share near (e+1)^-1 / H_E: a router
whose weights add log-Zipf biases through one input direction every token shares).

Backends: native (grouped_mm), native-compiled (the same with its elementwise work fused by
torch.compile, as train.compile does: combine, dispatch backward, SwiGLU), native-loop (one
GEMM per expert: the readable reference),
megablocks (skipped, saying why, where it cannot run), deepspeed at capacity factor 1 and 2
(dropping tokens), and `dense`: three plain GEMMs over T x K rows, the same activated FLOPs
with no routing at all, the ceiling. FLOPs are model FLOPs, 18 x T x K x D x F for forward
+ backward (3 GEMMs of 2 T K D F each, backward twice forward), the same for every backend
(a backend that drops tokens does less work and looks faster for it; its drop rate is shown).

Reported per (shape, routing, backend): median time of `--iters` steps after `--warmup`,
TFLOP/s, the ratio to dense and to megablocks, peak memory allocated during the step on CUDA
(total, and above what was held before it), the host synchronisations the layer's forward
made (CUDA's sync debug mode counts them on a GPU; `sync ops` counts the operations that would
synchronise on a GPU, on any device: benchmarks/host_syncs.py), the activation bytes one forward
keeps for backward (`saved MiB`: benchmarks/saved_tensors.py), the load imbalance (max / mean
tokens per expert) and the dropped fraction. A table on stdout and everything as JSON (`--out`). Nothing here is
asserted; tests/unit/test_bench_moe_layer.py only checks the harness on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.host_syncs import HostSyncCounter  # noqa: E402
from benchmarks.saved_tensors import saved_tensor_bytes  # noqa: E402
from model.config import MoEConfig  # noqa: E402
from model.moe import build_moe  # noqa: E402
from trainer.metrics import text_table  # noqa: E402

SHAPES = {  # hidden D, expert ffn F, experts E, top-k K, tokens T
    "mixtral-like": (4096, 14336, 8, 2, 8192),
    "fine-grained": (2048, 1024, 64, 8, 16384),
}
SMOKE_SHAPES = {"tiny-coarse": (64, 128, 8, 2, 256), "tiny-fine": (64, 32, 16, 4, 512)}
ROUTINGS = ("uniform", "zipf")
ZIPF_STRENGTH = 1.0
BACKENDS = ("dense", "native", "native-compiled", "native-loop", "megablocks", "deepspeed-cf1",
            "deepspeed-cf2")


def flops(D: int, F_: int, K: int, T: int) -> float:
    return 18.0 * T * K * D * F_


def routed_inputs(D: int, E: int, T: int, routing: str, device, dtype, seed: int = 0):
    """(x_TD, router weight (E, D)) whose top-k choices are near-uniform or Zipf-skewed.

    Zipf: every token has 1 in input feature 0 and router row e has -a log(e+1) there, so
    expert e's logit is shifted by that for every token: its softmax probability scales by
    (e+1)^-a on top of the random part (logits of standard deviation about 1). a =
    ZIPF_STRENGTH = 1 gives the busiest expert a share of the token-slots near Zipf(1)'s first
    share 1 / H_E where top-k allows it (at E 64, top-8 a token picks an expert once, so no
    share exceeds 1 / K = 0.125)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w = torch.randn(E, D, generator=g) * (D ** -0.5)
    if routing == "zipf":
        x[:, 0] = 1.0  # every token shares this input direction ...
        w[:, 0] = -ZIPF_STRENGTH * torch.log(torch.arange(1, E + 1, dtype=torch.float32))
    elif routing != "uniform":
        raise ValueError(f"routing ({routing!r}) must be one of {ROUTINGS}")
    return x.to(device, dtype), w


def canonical_weights(D: int, F_: int, E: int, device, dtype, seed: int = 1) -> dict:
    """The expert weights every backend row loads (and the dense reference's three matrices),
    drawn once per shape on the device from their own generator: no backend's construction
    can shift them (DeepSpeed's gate draws an nn.Linear from the global generator), and the
    mixtral-like experts (1.4e9 values) are not drawn on the host once per row."""
    g = torch.Generator(device).manual_seed(seed)

    def draw(*shape, fan_in):
        return (torch.randn(*shape, generator=g, device=device) * fan_in ** -0.5).to(dtype)

    return {"w1_EDF": draw(E, D, F_, fan_in=D), "w3_EDF": draw(E, D, F_, fan_in=D),
            "w2_EFD": draw(E, F_, D, fan_in=F_),
            "dense": [draw(D, F_, fan_in=D), draw(D, F_, fan_in=D), draw(F_, D, fan_in=F_)]}


def build(backend: str, D: int, F_: int, E: int, K: int, router_w, weights: dict, device, dtype):
    """A layer (or the dense reference) holding `weights` (canonical_weights) and `router_w`."""
    if backend == "dense":
        return [w.clone().requires_grad_() for w in weights["dense"]]
    kw = {"num_experts": E, "top_k": K, "expert_hidden": F_}
    if backend in ("native", "native-compiled"):
        cfg = MoEConfig(**kw)
    elif backend == "native-loop":
        cfg = MoEConfig(**kw, expert_impl="loop")
    elif backend == "megablocks":
        cfg = MoEConfig(**kw, backend="megablocks")
    elif backend.startswith("deepspeed-cf"):
        factor = float(backend.removeprefix("deepspeed-cf"))
        cfg = MoEConfig(**kw, backend="deepspeed", capacity_factor=factor,
                        eval_capacity_factor=factor, drop_tokens=True)
    else:
        raise ValueError(f"backend ({backend!r}) must be one of {BACKENDS}")
    with torch.device(device):  # allocated where it runs, not on the host first
        layer = build_moe(D, cfg).to(dtype)
    if backend == "native-compiled":  # what train.compile does to an MoE layer
        layer.compile_kernels()
    with torch.no_grad():
        layer.router.weight.copy_(router_w)
        for name in ("w1_EDF", "w3_EDF", "w2_EFD"):
            getattr(layer.experts, name).copy_(weights[name])
    return layer


def unavailable(backend: str, device: torch.device) -> str | None:
    if backend != "megablocks":
        return None
    from model.moe.megablocks_backend import why_unavailable

    return why_unavailable(device)


def forward(backend: str, layer, x, K: int):
    """One forward: (output, route); route is None for dense."""
    if backend == "dense":
        w1, w3, w2 = layer
        x_rows = x.repeat_interleave(K, dim=0, output_size=x.shape[0] * K)  # as many rows as slots
        return (F.silu(x_rows @ w1) * (x_rows @ w3)) @ w2, None
    y, route = layer(x.unsqueeze(0))
    return y.squeeze(0), route


def step_fn(backend: str, layer, x, K: int, grad):
    """One forward + backward; returns the forward's route (None for dense)."""
    y, route = forward(backend, layer, x, K)
    y.backward(grad.repeat_interleave(K, dim=0) if backend == "dense" else grad)
    return route


def forward_costs(backend: str, layer, x, K: int, params) -> dict:
    """What one forward costs besides time, on any device: the operations in it that make the
    host wait on a GPU (benchmarks.host_syncs) and the bytes it keeps for backward."""
    with HostSyncCounter() as syncs:
        saved, _ = saved_tensor_bytes(lambda: forward(backend, layer, x, K), params)
    return {"sync_ops": syncs.count, "saved_mib": saved / 2**20}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_forward_syncs(backend: str, layer, x, K: int) -> int | None:
    """Host synchronisations in one forward (CUDA only), from torch's sync debug mode."""
    if x.device.type != "cuda":
        return None
    _sync(x.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                forward(backend, layer, x, K)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def profile_ops(backend: str, layer, x, K: int, grad, params, steps: int = 2,
                top: int = 12) -> list[dict]:
    """Where one step's time goes: the `top` operations by their own time on the device (CPU
    time on a CPU), per step, with their share of the total. For tuning, not for comparing.
    Gradients are cleared before each step, as in the timed steps (accumulating into them
    added three weight-sized additions per step to the profile)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            for p in params:
                p.grad = None
            step_fn(backend, layer, x, K, grad)
        _sync(x.device)
    return rank_ops(prof, cuda, steps, top)[0]


def rank_ops(prof, cuda: bool, steps: int, top: int, exclude=()) -> tuple[list[dict], float]:
    """(the `top` operations of a finished torch.profiler run by their own device time (CPU
    time on a CPU), per step, with their share; the total in microseconds). `exclude`: names
    left out of the ranking (record_function regions)."""
    from torch.autograd import DeviceType

    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    # On CUDA both an operation and the kernels it launched carry the kernels' device time:
    # the total is the kernels' (as torch's own table sums it), the ranking is by operation.
    events = [e for e in averages if getattr(e, key) > 0 and e.device_type == DeviceType.CPU
              and e.key not in exclude]
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA] if cuda else events
    total = sum(getattr(e, key) for e in kernels) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"op": e.key, "ms_per_step": getattr(e, key) / 1e3 / steps,
             "share": getattr(e, key) / total, "calls_per_step": e.count / steps}
            for e in events[:top]], total


def measure(backend, shape, routing, weights, device, dtype, iters: int, warmup: int,
            profile: bool = False) -> dict:
    D, F_, E, K, T = shape
    out = {"backend": backend, "flops": flops(D, F_, K, T)}
    why = unavailable(backend, device)
    if why:
        return out | {"skipped": why}
    x, router_w = routed_inputs(D, E, T, routing, device, dtype)
    # Inside a model the layer's input needs its gradient: without it backward skips the
    # input-gradient GEMMs (18 T K D F counts them) and every backend's un-permute backward.
    x.requires_grad_()
    grad = torch.randn(T, D, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    layer = build(backend, D, F_, E, K, router_w, weights, device, dtype)
    params = (layer if backend == "dense" else list(layer.parameters())) + [x]
    route = None
    for _ in range(warmup):
        route = step_fn(backend, layer, x, K, grad)
    for p in params:
        p.grad = None
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        for p in params:
            p.grad = None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            route = step_fn(backend, layer, x, K, grad)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            route = step_fn(backend, layer, x, K, grad)
            times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    out |= {"time_ms": seconds * 1e3, "tflops": out["flops"] / seconds / 1e12}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out |= {"peak_memory_gib": peak / 2**30, "peak_above_start_gib": (peak - before) / 2**30}
    out["forward_host_syncs"] = count_forward_syncs(backend, layer, x, K)
    out |= forward_costs(backend, layer, x, K, params)
    if profile:
        out["profile"] = profile_ops(backend, layer, x, K, grad, params)
    if route is not None:
        counts = route.counts_E.float()
        out["max_over_mean_load"] = float(counts.max() / counts.mean())
        dropped = route.dropped_slots
        out["dropped_fraction"] = float(dropped) / (T * K) if dropped is not None else 0.0
    return out


def _init_single_process(device: torch.device) -> None:
    """DeepSpeed's layer expects torch.distributed; a world of one does."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def run(shapes: dict, routings, backends, device, dtype, iters, warmup, progress=print,
        profile=(), on_result=None) -> dict:
    """Every (shape, routing, backend). A backend that raises (out of memory, a missing
    package) becomes a row with its error; `on_result(report)` gets the report so far after
    each (shape, routing), so a run cut short still leaves what it measured."""
    _init_single_process(device)
    results = []
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype).removeprefix("torch."),
              "iters": iters, "warmup": warmup, "results": results}
    for name, shape in shapes.items():
        D, F_, E, K, T = shape
        weights = canonical_weights(D, F_, E, device, dtype)
        for routing in routings:
            rows = []
            for backend in backends:
                progress(f"{name} {routing} {backend} ...")
                try:
                    rows.append(measure(backend, shape, routing, weights, device, dtype, iters,
                                        warmup, profile=backend in profile))
                except Exception as exc:  # noqa: BLE001 - one backend's failure is its row
                    rows.append({"backend": backend, "flops": flops(D, F_, K, T),
                                 "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                    progress(f"{name} {routing} {backend}: {rows[-1]['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            by = {r["backend"]: r for r in rows}
            for r in rows:
                for ref in ("dense", "megablocks"):
                    if "tflops" in r and "tflops" in by.get(ref, {}):
                        r[f"vs_{ref}"] = r["tflops"] / by[ref]["tflops"]
            results.append({"shape": name, "hidden": D, "expert_ffn": F_, "experts": E, "top_k": K,
                            "tokens": T, "routing": routing, "rows": rows})
            if on_result:
                on_result(report)
        del weights
    return report


LAYER_COLUMNS = [("backend", "backend", "{}", 15), ("ms", "time_ms", "{:.2f}", 9),
                 ("TFLOP/s", "tflops", "{:.3g}", 9), ("/dense", "vs_dense", "{:.3f}", 8),
                 ("/megabl.", "vs_megablocks", "{:.3f}", 9), ("peak GiB", "peak_memory_gib", "{:.2f}", 9),
                 ("+GiB", "peak_above_start_gib", "{:.2f}", 7), ("syncs", "forward_host_syncs", "{}", 6),
                 ("sync ops", "sync_ops", "{}", 9), ("saved MiB", "saved_mib", "{:.1f}", 10),
                 ("max/mean", "max_over_mean_load", "{:.2f}", 9), ("dropped", "dropped_fraction", "{:.3f}", 8),
                 ("  skipped", "skipped", "  {}", 0), ("  error", "error", "  {}", 0)]


PROFILE_COLUMNS = [("  operation", "op", "  {}", 40), ("ms/step", "ms_per_step", "{:.3f}", 9),
                   ("share", "share", "{:.3f}", 7), ("calls/step", "calls_per_step", "{:.0f}", 11)]


def table(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, CUDA {report['cuda']}, {report['dtype']}, "
             f"median of {report['iters']} steps (fwd+bwd)"]
    for res in report["results"]:
        lines.append(f"\n{res['shape']} (D {res['hidden']}, F {res['expert_ffn']}, E {res['experts']}, "
                     f"top-{res['top_k']}, T {res['tokens']}), {res['routing']} routing")
        lines.append(text_table(res["rows"], LAYER_COLUMNS))
        for row in res["rows"]:
            if row.get("profile"):
                lines.append(f"  where {row['backend']}'s step goes (top operations by own time):")
                lines.append(text_table(row["profile"], PROFILE_COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in fp32 on CPU")
    parser.add_argument("--shape", nargs="+", help=f"of {list(SHAPES)} (default all)")
    parser.add_argument("--routing", nargs="+", default=list(ROUTINGS), choices=ROUTINGS)
    parser.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; smoke 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "moe_layer.json")
    parser.add_argument("--profile", nargs="+", default=[], choices=BACKENDS, metavar="BACKEND",
                        help="also list where these backends' step time goes (torch.profiler)")
    args = parser.parse_args(argv)
    if args.smoke:
        device, dtype, shapes = torch.device("cpu"), torch.float32, SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            parser.error("the layer benchmark needs CUDA (--smoke runs tiny shapes on CPU)")
        device, dtype, shapes = torch.device("cuda", 0), torch.bfloat16, SHAPES
    if args.shape:
        unknown = [s for s in args.shape if s not in shapes]
        if unknown:
            parser.error(f"--shape {unknown} not among {list(shapes)}")
        shapes = {s: shapes[s] for s in args.shape}
    iters = args.iters or (2 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = run(shapes, args.routing, args.backend, device, dtype, iters, warmup,
                 progress=lambda m: print(m, file=sys.stderr, flush=True), profile=args.profile,
                 on_result=lambda r: args.out.write_text(json.dumps(r, indent=1)))
    print(table(report))
    print(f"\nwrote {args.out}")
    return 1 if any("error" in row for res in report["results"] for row in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
