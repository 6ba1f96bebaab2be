"""`moe-export CKPT OUT`: a checkpoint of ours as an HF directory (checkpoint/hf/export.py).

CKPT is a checkpoint directory, a run's checkpoints folder (its latest) or a run directory;
any layout, ZeRO partitions included. One process, no process group. Exit codes as training's
(launcher/exit_codes.py): 2 a request the model cannot meet, 4 a checkpoint problem, 8 a
write that failed.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

from checkpoint.hf.export import DEFAULT_SHARD_BYTES, EXPORTABLE, export_checkpoint, open_run_checkpoint
from checkpoint.hf.table import LAYOUTS
from launcher import exit_codes

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '64KiB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 1000000")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "").upper()])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory, checkpoints folder or run directory")
    p.add_argument("out", help="the HF directory to write (absent or empty)")
    p.add_argument("--family", choices=EXPORTABLE, default=None,
                   help="HF model type; default: the one the run started from, else the first "
                        "that can express the model")
    p.add_argument("--layout", choices=LAYOUTS, default="per_expert",
                   help="experts as save_pretrained writes them (per_expert) or fused")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                   help="largest safetensors file (default 5GB)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: as the checkpoint holds them")
    p.add_argument("--tokenizer", default=None,
                   help="directory whose tokenizer files go along (default: the HF directory "
                        "the run started from)")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        ckpt = open_run_checkpoint(args.checkpoint)
        out = export_checkpoint(ckpt, args.out, args.family, args.layout, args.max_shard_size,
                                None if args.dtype == "auto" else getattr(torch, args.dtype),
                                args.tokenizer, not args.no_tokenizer, not args.no_progress)
    except Exception as exc:  # noqa: BLE001 - every failure gets its exit code
        return exit_codes.tool_failure("moe-export", exc)
    print(f"exported {ckpt.path} (step {ckpt.step}) to {out}")
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
