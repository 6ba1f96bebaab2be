"""Inspect a checkpoint: `python -m launcher.inspect_checkpoint PATH` (or `moe-inspect PATH`).

PATH is a checkpoint directory or a run's checkpoints folder (its `latest` is taken). Prints
the step, the layout it was saved with, every tensor (global shape, dtype, pieces, bytes) and
whether every file matches its checksum. One process, no process group. Exit status 0 when the
checkpoint verifies, 1 when it does not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from checkpoint.errors import CheckpointError
from checkpoint.reader import resolve
from checkpoint.store import FORMAT, VERSION


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def describe(path: str, show_tensors: bool = True) -> tuple[str, bool]:
    """The report, and whether the checkpoint verified."""
    try:
        ckpt, _ = resolve(path, Path(path))
    except CheckpointError as exc:
        return f"not a usable checkpoint: {exc}", False
    if ckpt is None:  # "auto" resolves against a run dir: name the checkpoint or its folder
        return (f"not a usable checkpoint: {path!r} names no checkpoint (give a checkpoint "
                "directory or a checkpoints/ folder)"), False
    meta, lay = ckpt.meta, ckpt.meta.get("layout", {})
    files = ckpt.manifest["files"]
    kinds = {k: sum(n.startswith(k + "/") for n in ckpt.tensors) for k in ("model", "buffer", "master", "optim")}
    params = sum(_numel(i["shape"]) for n, i in ckpt.tensors.items() if n.startswith("model/"))
    lines = [
        f"checkpoint {ckpt.path} ({FORMAT} v{VERSION})",
        f"step {ckpt.step}; Adam step {meta.get('adam_step')}; {meta.get('samples_seen')} samples, "
        f"{meta.get('tokens_seen')} tokens seen",
        f"saved with world {lay.get('world_size')} = dp {lay.get('dp')} x tp {lay.get('tp')}, "
        f"ep {lay.get('ep')}, zero_stage {meta.get('zero_stage')}, moe.backend {meta.get('moe_backend')}",
        f"{len(files)} shard files, {_size(sum(f['bytes'] for f in files.values()))}; "
        f"{kinds['model']} parameters ({params:,} values), {kinds['master']} master copies, "
        f"{kinds['optim']} optimizer moments" + (f", {kinds['buffer']} buffers" if kinds["buffer"] else ""),
    ]
    if show_tensors:
        width = max(len(n) for n in ckpt.tensors)
        lines.append(f"{'tensor':<{width}}  {'global shape':<16} {'dtype':<9} pieces")
        for name, info in sorted(ckpt.tensors.items()):
            shape = "x".join(map(str, info["shape"])) or "scalar"
            lines.append(f"{name:<{width}}  {shape:<16} {info['dtype']:<9} {len(info['pieces'])}")
    try:
        ckpt.verify()
    except CheckpointError as exc:
        lines.append(f"verification FAILED: {exc}")
        return "\n".join(lines), False
    bad = non_finite(ckpt)
    if bad:
        lines.append(f"verification FAILED: {len(bad)} of {len(ckpt.tensors)} tensors hold NaN "
                     f"or inf, e.g. {', '.join(bad[:3])}")
        return "\n".join(lines), False
    lines.append(f"verified: all {len(files)} files match their sha256 in the manifest; every "
                 "tensor is finite")
    return "\n".join(lines), True


def non_finite(ckpt) -> list[str]:
    """Tensors of the checkpoint that hold a NaN or an infinity (reads every one)."""
    return [name for name, info in sorted(ckpt.tensors.items())
            if not info["dtype"].startswith(("int", "uint", "bool"))
            and not bool(torch.isfinite(ckpt.full(name)).all())]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-inspect", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="checkpoint directory, or a run's checkpoints folder")
    parser.add_argument("--summary", action="store_true", help="omit the table of tensors")
    args = parser.parse_args(argv)
    report, ok = describe(args.path, show_tensors=not args.summary)
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
