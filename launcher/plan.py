"""Plan a job before launching it: `moe-plan --config FILE [--section.key=value ...] --gpus N`.

Memory per rank (itemised), every collective of a step with its bytes, and a modelled step
time, for the config's layout on N GPUs; with --search, for every valid layout, ranked by what
fits and by modelled step time. One CPU process, nothing large built (planner/). What every
line means: docs/planner.md.

    moe-plan --config configs/gpu_moe_1b.yaml --gpus 64 --gpus-per-node 8 --parallel.ep=8
    moe-plan --config configs/gpu_moe_1b.yaml --gpus 64 --search --hardware h200
    moe-plan --config configs/cpu_tiny.yaml --gpus 4 --device cpu --json
"""

from __future__ import annotations

import argparse
import json
import sys

from launcher import exit_codes
from launcher.config import load_config
from model.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-plan", allow_abbrev=False, description=__doc__.split("\n")[0],
        epilog="Other arguments are the trainer's: --config FILE and --section.key=value overrides.")
    p.add_argument("--gpus", type=int, required=True, help="world size (ranks)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: min(gpus, 8)")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GiB (default: the preset's)")
    p.add_argument("--hardware", default="h100", help="preset: h100 or h200")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="whose kernels to model (the trainer on CPU keeps more for RMSNorm)")
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="busiest expert-parallel rank's received rows over the mean (1 = balanced)")
    for name, what in (("peak-tflops", "dense bf16 TFLOP/s per GPU"), ("hbm-tbps", "HBM TB/s"),
                       ("intra-gbps", "in-node GB/s each way"), ("inter-gbps", "network GB/s per GPU each way"),
                       ("matmul-efficiency", "fraction of peak reached"),
                       ("link-efficiency", "fraction of link bandwidth reached")):
        p.add_argument(f"--{name}", type=float, default=None, help=what)
    p.add_argument("--search", action="store_true", help="plan every valid layout, ranked")
    p.add_argument("--top", type=int, default=15, help="--search: rows to print (JSON has all)")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of text")
    return p


def make_hardware(args):
    from planner.hardware import hardware, parse_bytes

    memory = parse_bytes(args.gpu_memory) / (1 << 30) if args.gpu_memory else None
    return hardware(args.hardware, memory_gib=memory, peak_tflops=args.peak_tflops,
                    hbm_tbps=args.hbm_tbps, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
                    matmul_efficiency=args.matmul_efficiency, link_efficiency=args.link_efficiency)


def run(argv: list[str]) -> str:
    from planner.plan import make_plan
    from planner.report import as_dict, text

    args, rest = parser().parse_known_args(argv)
    if args.gpus < 1:
        raise ConfigError(f"--gpus ({args.gpus}) must be >= 1")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node ({args.gpus_per_node}) must be >= 1")
    per_node = args.gpus_per_node or min(args.gpus, 8)
    job = load_config(rest)
    hw = make_hardware(args)
    config = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--config"), "defaults")
    if args.search:
        from planner.search import search
        from planner.search_report import search_dict, search_text

        plans, refused = search(job, args.gpus, per_node, hw, args.imbalance, args.device)
        return (json.dumps(search_dict(plans, refused), indent=1) if args.json
                else search_text(plans, refused, args.top, f"moe-plan --search {config}"))
    plan = make_plan(job, args.gpus, per_node, args.imbalance, args.device, hw)
    return json.dumps(as_dict(plan), indent=1) if args.json else text(plan, f"moe-plan {config}")


def main(argv: list[str] | None = None) -> int:
    try:
        print(run(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
