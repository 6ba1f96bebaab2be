"""Save and load throughput of our sharded checkpoint against torch.save / torch.load and
torch.distributed.checkpoint (DCP), side by side in one run, on 4 gloo ranks (CPU).

    python benchmarks/checkpoint_io.py                    # cpu_tiny, the same under ZeRO-2, ~1 GB
    python benchmarks/checkpoint_io.py --cases 1gb --reps 3 --warmup 1
    python benchmarks/checkpoint_io.py --smoke            # a tiny model, one repetition (the test)

Each case builds the model at dp 4 x ep 4 (configs/cpu_tiny.yaml and the case's overrides) in
4 processes (tests/distributed/spawn.py), takes one optimizer step so Adam's state exists,
then every repetition runs each variant once, in an order rotated by one per repetition:

  ours           save_checkpoint; load: open_checkpoint + load_checkpoint, the resume path of
                 an explicit checkpoint: each rank reads every piece it holds from whichever
                 file holds it (ranks 1-3 read rank 0's file for the dense weights), checking
                 the sha256 of each file it reads, and copies into the model and the optimizer
  ours-trusted   the same load with the checksums skipped (Checkpoint.trust): their cost apart
  torch          each rank torch.save's the dict ours writes into its shard file (the same
                 keys and tensors) to its own file, flush, fsync; load: torch.load of that file
  torch-nofsync  the same save without fsync: what fsync costs
  dcp            dcp.save / dcp.load through FileSystemWriter / FileSystemReader (fsync on,
                 their default) of the same dict under rank-unique keys ("<rank>/<key>"), loaded
                 into preallocated tensors. Rank-unique keys rather than DTensors: every rank
                 writes exactly the tensors and bytes it writes in ours, and ZeRO's fragments
                 (flat ranges of a parameter) have no DTensor placement. Each rank loads only
                 its own keys, so DCP and torch do no resharding and read no other rank's file.

Every operation is timed between two barriers (the slowest rank's time). Loads run warm
(rank 0 reads every file once first) and cold (each file's pages dropped first with
posix_fadvise(DONTNEED): it needs no root and leaves the page cache of others on a shared
machine alone; the files are clean after fsync); `fincore` reports the resident fraction
before each load. Before each load of ours the live state is zeroed (and the RNG advanced);
after every load the restored tensors must equal the saved ones bitwise, or the run fails.
`--warmup` repetitions come first and stay out of the medians (kept in the JSON): the first
use of a code path and of fresh memory in a process costs more. GB/s is the state's tensor
bytes (1 GB = 1e9 bytes) over the median seconds. Nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.checkpoint_io_worker import BASE, LOADS, SAVES, worker  # noqa: E402
from trainer.metrics import text_table  # noqa: E402

WORLD = 4
CASES = {  # name -> overrides of configs/cpu_tiny.yaml
    "cpu_tiny": [],
    "cpu_tiny_zero2": ["--parallel.zero_stage=2"],
    # parameters and Adam's two moments, fp32: 83.1 M x 12 bytes = 1.0 GB
    "1gb": ["--model.dim=512", "--model.n_heads=8", "--moe.expert_hidden=1600"],
    "smoke": ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--moe.expert_hidden=16"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES),
                        default=["cpu_tiny", "cpu_tiny_zero2", "1gb"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="repetitions first, not in the medians")
    parser.add_argument("--smoke", action="store_true", help="--cases smoke --reps 1 --warmup 0")
    parser.add_argument("--scratch", default=None, help="where the checkpoints are written (a temporary dir)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/2026-12-03"))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    args = parser.parse_args()
    if args.smoke:
        args.cases, args.reps, args.warmup = ["smoke"], 1, 0
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps ({args.reps}) must be at least 1 and --warmup ({args.warmup}) at least 0")
    from tests.distributed.spawn import run_distributed

    command = "python benchmarks/checkpoint_io.py " + shlex.join(sys.argv[1:])
    load_before, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rows, warmups = [], {}
    for case in args.cases:
        print(f"measuring {case} ...", file=sys.stderr, flush=True)
        scratch = tempfile.mkdtemp(prefix="ckpt_io_", dir=args.scratch)
        try:
            per_rank = run_distributed(worker, WORLD, (CASES[case], args.reps, args.warmup, scratch),
                                       timeout_s=args.timeout)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows += summarize(case, per_rank)
        warmups[case] = per_rank[0]["warmup"]
    report = {"command": command, "started": started, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
              "niceness": os.nice(0), "machine": machine(),
              "world_size": WORLD, "reps": args.reps, "warmup": args.warmup,
              "cases": {c: BASE + CASES[c] for c in args.cases},
              "rows": rows, "warmup_reps_rank0": warmups}
    write(report, Path(args.out))


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def summarize(case: str, per_rank: list[dict]) -> list[dict]:
    """One row per variant: medians over repetitions, bytes summed over ranks, ratios to torch."""
    state = sum(r["state_bytes"] for r in per_rank)
    reps = per_rank[0]["reps"]  # rank 0 holds the barrier-to-barrier times and the file sizes
    rows = []
    for save in SAVES:
        for name in dict.fromkeys((save, *LOADS[save])):  # ours saves and loads; ours-trusted loads
            saving, loads = name == save, name in LOADS[save]
            row = {"case": case, "variant": name, "state_bytes": state,
                   "bytes_written": reps[0][save]["bytes_written"] if saving else None,
                   "save_s": median([r[save]["save_s"] for r in reps]) if saving else None,
                   "save_s_all": [r[save]["save_s"] for r in reps] if saving else None}
            for cache in ("warm", "cold"):
                times = [r[save]["load"][name][cache]["s"] for r in reps] if loads else None
                row[f"load_{cache}_s"] = median(times) if times else None
                row[f"load_{cache}_s_all"] = times
                row[f"resident_{cache}"] = reps[0][save]["load"][name][cache]["resident"] if loads else None
            # what every rank read, summed (ours: the files holding its pieces; others: its own)
            row["bytes_read"] = (sum(p["reps"][0][save]["load"][name]["bytes_read"] for p in per_rank)
                                 if loads else None)
            if save == "ours" and saving:
                for key in ("finite_s", "sha256_s", "commit_s"):
                    row[key] = median([r[save][key] for r in reps])
                row["manifest_bytes"] = reps[0][save]["manifest_bytes"]
            rows.append(row)
    for row in rows:  # the spread: on a shared machine the others' load moves every number
        for key in ("save_s", "load_warm_s", "load_cold_s"):
            times = row[f"{key}_all"]
            row[f"{key}_min"], row[f"{key}_max"] = (min(times), max(times)) if times else (None, None)
    base = next(r for r in rows if r["variant"] == "torch")
    for row in rows:
        for key in ("save_s", "load_warm_s", "load_cold_s"):
            if row[key] is not None:
                row[key.replace("_s", "_gbps")] = state / 1e9 / row[key]
                row[key.replace("_s", "_vs_torch")] = row[key] / base[key]
    return rows


COLUMNS = [("case", "case", "{}", 15), ("variant", "variant", "{}", 15),
           ("state MB", "state_bytes", "{:.1f}", 10, 1e-6),
           ("written MB", "bytes_written", "{:.1f}", 11, 1e-6), ("read MB", "bytes_read", "{:.1f}", 9, 1e-6),
           ("save s", "save_s", "{:.3f}", 8), ("GB/s", "save_gbps", "{:.3f}", 7),
           ("x torch", "save_vs_torch", "{:.2f}", 8),
           ("warm load s", "load_warm_s", "{:.3f}", 12), ("GB/s", "load_warm_gbps", "{:.3f}", 7),
           ("x torch", "load_warm_vs_torch", "{:.2f}", 8),
           ("cold load s", "load_cold_s", "{:.3f}", 12), ("GB/s", "load_cold_gbps", "{:.3f}", 7),
           ("x torch", "load_cold_vs_torch", "{:.2f}", 8)]

SPREAD = [("case", "case", "{}", 15), ("variant", "variant", "{}", 15),
          ("save min", "save_s_min", "{:.3f}", 10), ("max", "save_s_max", "{:.3f}", 8),
          ("warm load min", "load_warm_s_min", "{:.3f}", 14), ("max", "load_warm_s_max", "{:.3f}", 8),
          ("cold load min", "load_cold_s_min", "{:.3f}", 14), ("max", "load_cold_s_max", "{:.3f}", 8)]


def write(report: dict, out: Path) -> None:
    rows = report["rows"]
    parts = [f"$ {report['command']}",
             f"started {report['started']}; {report['machine']}; {report['cpus']} CPUs; "
             f"nice {report['niceness']}; "
             f"{report['world_size']} gloo ranks; {report['warmup']} warm-up and {report['reps']} "
             "measured repetitions, medians",
             "load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}".format(*report["load_average_before"]),
             "load average (1, 5, 15 min) after:  {:.2f} {:.2f} {:.2f}".format(*report["load_average_after"]),
             "", text_table(rows, COLUMNS), "",
             "x torch: seconds over torch's seconds (above 1 is slower). written MB: every file of the save. "
             "read MB: the files each",
             "rank read to load, summed over ranks; ours hashes every file once across the job (each rank "
             "a share, as a resume does) and maps its pieces' files, ours-trusted only maps them.", "",
             "seconds, fastest and slowest of the measured repetitions:", text_table(rows, SPREAD), "",
             "resident in the page cache before each load (fincore; warm / cold):"]
    parts += [f"  {r['case']} {r['variant']}: {r['resident_warm']} / {r['resident_cold']}"
              for r in rows if r["load_warm_s"] is not None]
    parts += ["", "steps of ours' save that torch.save lacks, each timed alone (medians, seconds):",
              f"  {'case':<15}{'finite check':>13}{'sha256':>8}{'commit':>8}  (manifest.json bytes)"]
    parts += [f"  {r['case']:<15}{r['finite_s']:>13.3f}{r['sha256_s']:>8.3f}{r['commit_s']:>8.3f}  "
              f"({r['manifest_bytes']})" for r in rows if r.get("sha256_s") is not None]
    parts += ["  finite check and sha256 (the save computes it as it writes; here over the cached file): "
              "every rank its own pieces and file, in parallel; commit: rank 0 "
              "writes manifest.json and COMMIT, fsyncs, renames, writes latest"]
    text = "\n".join(parts) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint_io.txt").write_text(text)
    (out / "checkpoint_io.json").write_text(json.dumps(report, indent=1) + "\n")


def machine() -> str:
    import torch

    return f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}"


if __name__ == "__main__":
    main()
