"""Scaling sweep: the same model at several node counts, strong and weak scaling, one CSV and
one plot per mode.

    python -m launcher.sweep --nodes 1 2 4 --per-node 4 --launcher slurm \\
        -- --config configs/cpu_tiny.yaml --train.steps=50
    make sweep                                    # local, simulated nodes (launcher.simulate)

Every point runs the job's arguments at world = nodes x per_node with parallel.dp = world / tp
and parallel.ep = `--ep` (default: the largest that divides both dp and moe.num_experts):
- strong: the global batch is fixed (`--global-batch` sequences, default the config's micro
  batch x dp at the smallest world x grad_accum); each rank's micro batch shrinks as the
  world grows.
- weak: each rank keeps the config's micro batch; the global batch grows with dp.
Ideal scaling is throughput proportional to the world size in both modes; `efficiency` is the
measured speed-up over the smallest world divided by that ideal.

Each point's numbers come from its summary.json (trainer/loop.py): steady-state training
tokens/s (warm-up steps, evaluation and checkpoints left out), MFU (model FLOPs from
model/flops.py over `--peak-tflops` per device, or a known GPU's peak; blank on CPU unless
given) and the peak memory of the busiest rank. Results go to OUT/scaling.csv and
OUT/scaling_{strong,weak}.png (ideal lines dashed); each run's output to OUT/<point>/launch.log.

Launchers: `local` runs `python -m launcher.simulate` (one torchrun agent per simulated node
on this machine); `slurm` submits slurm/train.sbatch (srun, one task per rank) with
`sbatch --nodes=N --ntasks-per-node=P` and waits for the job; `slurm-torchrun` submits
slurm/train_torchrun.sbatch (one torchrun agent per node, PROCS_PER_NODE=P). Every point is
planned and its config validated before the first run, so a bad combination fails at once,
naming the values. A point whose arguments equal an earlier one (the smallest world of the
two modes usually does) runs once; a finished point whose arguments are unchanged is reused
when the sweep is run again (`--rerun` runs everything). A failed point is recorded and the
sweep goes on; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config import JobConfig, load_config
from launcher.run_dir import holds_a_run, move_aside
from model.errors import ConfigError
from trainer.metrics import text_table

MODES = ("strong", "weak")
LAUNCHERS = ("local", "slurm", "slurm-torchrun")
TEMPLATES = {"slurm": "slurm/train.sbatch", "slurm-torchrun": "slurm/train_torchrun.sbatch"}
COLUMNS = ("mode", "nodes", "per_node", "world", "dp", "ep", "tp", "micro_batch_size",
           "global_batch", "tokens_per_step", "train_tokens_per_s", "tokens_per_s_per_rank",
           "speedup", "ideal_speedup", "efficiency", "step_time_s", "mfu", "peak_memory_gib",
           "peak_memory_kind", "final_eval_loss", "status", "run_dir")


SWEEP_COLUMNS = [("point", "point", "{}", 16), ("tokens/s", "train_tokens_per_s", "{:,.0f}", 12),
                 ("speedup", "speedup", "{:.2f}", 9), ("ideal", "ideal_speedup", "{:.0f}", 7),
                 ("effic.", "efficiency", "{:.2f}", 8), ("MFU", "mfu", "{:.3f}", 8),
                 ("peak GiB", "peak_memory_gib", "{:.2f}", 10), ("  status", "status", "  {}", 0)]


@dataclass
class Point:
    mode: str
    nodes: int
    per_node: int
    dp: int
    ep: int
    tp: int
    micro_batch_size: int
    grad_accum: int
    run_dir: Path
    args: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    @property
    def name(self) -> str:
        return f"{self.mode}_{self.nodes}x{self.per_node}"


def plan(job_args: list[str], modes: list[str], nodes: list[int], per_node: list[int], out: Path,
         ep: str = "max", global_batch: int | None = None) -> list[Point]:
    """Every point of the sweep, each config validated at its world size. Raises ConfigError
    naming the values before anything runs."""
    for name, values in (("--nodes", nodes), ("--per-node", per_node)):
        if not values or any(v < 1 for v in values):
            raise ConfigError(f"{name} ({values}) must be one or more integers >= 1")
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"--mode {mode!r} is not one of {list(MODES)}")
    base = load_config(job_args)
    tp, accum, micro = base.parallel.tp, base.train.grad_accum, base.train.micro_batch_size
    shapes = sorted({(n, p) for n in nodes for p in per_node}, key=lambda s: (s[0] * s[1], s[0]))
    for n, p in shapes:
        if (n * p) % tp:
            raise ConfigError(f"world {n * p} ({n} nodes x {p}) must be divisible by parallel.tp ({tp})")
    smallest_dp = shapes[0][0] * shapes[0][1] // tp
    batch = global_batch if global_batch is not None else micro * smallest_dp * accum
    points = []
    for mode in modes:
        for n, p in shapes:
            dp = n * p // tp
            point_ep = _ep(ep, dp, base)
            if mode == "strong":
                if batch % (dp * accum):
                    raise ConfigError(
                        f"strong scaling keeps the global batch at {batch} sequences: it must be "
                        f"divisible by dp x train.grad_accum ({dp} x {accum}) at world {n * p} "
                        f"({n} nodes x {p}); choose --global-batch or the node counts to fit")
                point_micro = batch // (dp * accum)
            else:
                point_micro = micro
            point = Point(mode, n, p, dp, point_ep, tp, point_micro, accum, out / f"{mode}_{n}x{p}")
            point.args = ["--checkpoint.save_final=false", "--logging.progress=false", *job_args,
                          f"--parallel.dp={dp}", f"--parallel.ep={point_ep}",
                          f"--train.micro_batch_size={point_micro}", "--checkpoint.resume=auto",
                          f"--logging.run_dir={point.run_dir}"]
            job = load_config(point.args)
            try:
                job.validate(point.world)
            except ConfigError as exc:
                raise ConfigError(f"{mode} scaling at {n} nodes x {p}: {exc}") from None
            points.append(point)
    return points


def _ep(ep: str, dp: int, base: JobConfig) -> int:
    if ep == "max":
        return math.gcd(dp, base.moe.num_experts)
    if ep == "config":
        return base.parallel.ep
    try:
        value = int(ep)
    except ValueError:
        raise ConfigError(f"--ep ({ep!r}) must be 'max', 'config' or an integer") from None
    return value


def _key(point: Point, launcher: str = "local", template: str | None = None,
         sbatch_args: list[str] = ()) -> str:
    """What makes two points the same experiment: the resolved config (the file's content, not
    its path; the run dir left out), the node layout (2 x 2 is not 1 x 4: the inter-node
    traffic is what a sweep measures) and how it is launched. Equal keys run once; a finished
    point is reused only under the same key."""
    job = load_config(point.args).to_dict()
    job["logging"].pop("run_dir")
    return json.dumps({"config": job, "nodes": point.nodes, "per_node": point.per_node,
                       "launcher": launcher, "template": template,
                       "sbatch_args": list(sbatch_args)}, sort_keys=True)


def launch_command(point: Point, launcher: str, template: str | None,
                   sbatch_args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if launcher == "local":
        return ([sys.executable, "-m", "launcher.simulate", "--nodes", str(point.nodes),
                 "--nproc-per-node", str(point.per_node), "--", *point.args], env)
    template = template or TEMPLATES[launcher]
    tasks = point.per_node if launcher == "slurm" else 1
    env.update(PY=sys.executable, RUN_DIR=str(point.run_dir), PROCS_PER_NODE=str(point.per_node))
    return (["sbatch", "--parsable", f"--chdir={Path.cwd()}", f"--nodes={point.nodes}",
             f"--ntasks-per-node={tasks}", f"--job-name=sweep-{point.name}",
             f"--output={point.run_dir.resolve()}/slurm-%j.out", *sbatch_args,
             str(Path(template).resolve()), *point.args], env)


def run_point(point: Point, launcher: str, template: str | None, sbatch_args: list[str]) -> int:
    """Run one point to its end; its exit code (a Slurm job's from scontrol)."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    if holds_a_run(point.run_dir):  # a new run of the point; a requeued job resumes (auto)
        moved = move_aside(point.run_dir)
        print(f"  the point's previous run moved to {moved}", flush=True)
    cmd, env = launch_command(point, launcher, template, sbatch_args)
    with open(point.run_dir / "launch.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if launcher != "local" else log,
                              stderr=subprocess.STDOUT, text=True)
        if launcher == "local" or proc.returncode:
            log.write(proc.stdout or "")
            return proc.returncode
        job = proc.stdout.strip().split(";")[0]
        log.write(f"submitted job {job}; its output: slurm-{job}.out\n")
        log.flush()  # readable while the sweep waits for the job
        return wait_for_job(job)


SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def slurm_job_state(job: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} if unknown."""
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True,
                         env=env).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for_job(job: str, poll_s: float = 2.0) -> int:
    """Poll scontrol until the job ends (sbatch --wait checks ever more rarely, up to tens of
    seconds apart); returns its exit code, 1 for an end other than COMPLETED without one."""
    while True:
        state = slurm_job_state(job)
        if state.get("JobState") in SLURM_ENDED:
            code = int(state.get("ExitCode", "1:0").split(":")[0])
            return code if code or state["JobState"] == "COMPLETED" else 1
        time.sleep(poll_s)


def log_tail(run_dir: Path, lines: int = 15) -> tuple[Path, list[str]]:
    """The end of a run's output: the newest Slurm job log in `run_dir`, else launch.log."""
    logs = sorted(run_dir.glob("slurm-*.out"), key=lambda p: p.stat().st_mtime)
    path = logs[-1] if logs else run_dir / "launch.log"
    return path, path.read_text(errors="replace").splitlines()[-lines:]


def row(point: Point, summary: dict | None, status: str) -> dict:
    r = {"mode": point.mode, "nodes": point.nodes, "per_node": point.per_node,
         "world": point.world, "dp": point.dp, "ep": point.ep, "tp": point.tp,
         "micro_batch_size": point.micro_batch_size,
         "global_batch": point.micro_batch_size * point.dp * point.grad_accum,
         "status": status, "run_dir": str(point.run_dir)}
    if summary:
        tps = summary.get("train_tokens_per_s")
        memory = summary.get("peak_memory_bytes")
        r |= {"tokens_per_step": summary.get("tokens_per_step"), "train_tokens_per_s": tps,
              "tokens_per_s_per_rank": tps / point.world if tps else None,
              "step_time_s": summary.get("step_time_s"), "mfu": summary.get("mfu"),
              "peak_memory_gib": memory / 2**30 if memory else None,
              "peak_memory_kind": summary.get("peak_memory_kind"),
              "final_eval_loss": summary.get("final_eval_loss")}
    return r


def add_efficiency(rows: list[dict]) -> None:
    """Speed-up over the mode's smallest successful world, the ideal, and their ratio."""
    for mode in MODES:
        done = [r for r in rows if r["mode"] == mode and r.get("train_tokens_per_s")]
        if not done:
            continue
        base = min(done, key=lambda r: r["world"])
        for r in done:
            r["speedup"] = r["train_tokens_per_s"] / base["train_tokens_per_s"]
            r["ideal_speedup"] = r["world"] / base["world"]
            r["efficiency"] = r["speedup"] / r["ideal_speedup"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k)) for k in COLUMNS})


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def plot(rows: list[dict], mode: str, path: Path) -> bool:
    """Throughput and efficiency against the world size, ideal scaling dashed. False when
    the mode has no finished point."""
    done = sorted((r for r in rows if r["mode"] == mode and r.get("train_tokens_per_s")),
                  key=lambda r: r["world"])
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [r["world"] for r in done]
    base = done[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(worlds, [r["train_tokens_per_s"] for r in done], "o-", label="measured")
    ax1.plot(worlds, [base["train_tokens_per_s"] * w / base["world"] for w in worlds], "k--",
             label="ideal (linear)")
    ax1.set_ylabel("training tokens/s")
    ax2.plot(worlds, [r["efficiency"] for r in done], "o-", label="measured")
    ax2.axhline(1.0, color="k", linestyle="--", label="ideal")
    ax2.set_ylabel("scaling efficiency")
    ax2.set_ylim(0, max(1.1, max(r["efficiency"] for r in done) * 1.1))
    labels = [f"{r['world']}\n{r['nodes']}x{r['per_node']}" for r in done]
    for ax in (ax1, ax2):
        if len(set(worlds)) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, labels)
        ax.minorticks_off()
        ax.set_xlabel("ranks (nodes x ranks per node)")
        ax.grid(alpha=0.3)
        ax.legend()
    batch = (f"global batch {base['global_batch']} sequences" if mode == "strong"
             else f"micro batch {base['micro_batch_size']} per rank")
    fig.suptitle(f"{mode} scaling, {batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json (trainer/loop.py), or None when it is missing or unreadable, or
    when the run stopped early on a signal (a preempted attempt whose job was not requeued or
    whose requeue has not ended yet): its figures would cover fewer steps than asked."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return None if summary.get("stopped") else summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.sweep",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2], help="node counts (default 1 2)")
    parser.add_argument("--per-node", type=int, nargs="+", default=[2],
                        help="ranks per node: GPUs, or CPU processes (default 2)")
    parser.add_argument("--mode", nargs="+", default=list(MODES), help="strong, weak or both (default)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
    parser.add_argument("--template", help="sbatch script (default slurm/train.sbatch or "
                        "slurm/train_torchrun.sbatch by --launcher)")
    parser.add_argument("--sbatch-arg", action="append", default=[],
                        help="extra sbatch option, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    parser.add_argument("--ep", default="max", help="expert parallelism per point: max (default: "
                        "gcd(dp, num_experts)), config, or an integer")
    parser.add_argument("--global-batch", type=int, help="strong scaling's global batch in sequences")
    parser.add_argument("--peak-tflops", type=float,
                        help="peak TFLOP/s of one device for MFU, passed to every run as "
                        "logging.peak_tflops (else a known GPU's figure)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="default runs/sweep")
    parser.add_argument("--rerun", action="store_true", help="run points that already finished")
    parser.add_argument("--no-plots", action="store_true", help="the CSV alone, no plots")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then launcher.train arguments")
    args = parser.parse_args(argv)
    job_args = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
    try:
        if args.peak_tflops is not None and args.peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops ({args.peak_tflops}) must be > 0")
        if args.peak_tflops:  # every run computes its MFU with it (trainer/loop.py)
            job_args = [*job_args, f"--logging.peak_tflops={args.peak_tflops}"]
        points = plan(job_args, args.mode, args.nodes, args.per_node, args.out, args.ep,
                      args.global_batch)
    except ConfigError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {len(points)} points ({', '.join(p.name for p in points)}) with "
          f"--launcher {args.launcher}; results in {args.out}", flush=True)
    rows, ran, failed = [], {}, 0
    for i, point in enumerate(points, 1):
        key = _key(point, args.launcher, args.template, args.sbatch_arg)
        head = (f"[{i}/{len(points)}] {point.mode} {point.nodes}x{point.per_node}: world "
                f"{point.world}, dp {point.dp}, ep {point.ep}, tp {point.tp}, micro batch "
                f"{point.micro_batch_size}")
        marker = point.run_dir / "sweep_point.json"
        summary = None
        if key in ran:
            summary, status = ran[key]
            print(f"{head}: same run as {status}", flush=True)
            status = f"same as {status}"
        elif (not args.rerun and marker.is_file() and marker.read_text() == key
              and (summary := read_summary(point.run_dir))):
            status = "reused"
            print(f"{head}: reusing the finished run in {point.run_dir}", flush=True)
        else:
            print(f"{head}: running ...", flush=True)
            marker.unlink(missing_ok=True)
            started = time.monotonic()
            code = run_point(point, args.launcher, args.template, args.sbatch_arg)
            summary = read_summary(point.run_dir) if code == 0 else None
            if summary is None:
                status = f"failed (exit {code})"
                failed += 1
                path, tail = log_tail(point.run_dir)
                print(f"  {status} after {time.monotonic() - started:.0f} s; end of {path}:\n    "
                      + "\n    ".join(tail), flush=True)
            else:
                status = "ok"
                marker.write_text(key)
                print(f"  done in {time.monotonic() - started:.0f} s: "
                      f"{summary['train_tokens_per_s']:,.0f} tokens/s", flush=True)
        if summary is not None:
            ran.setdefault(key, (summary, point.name))
        rows.append(row(point, summary, status))
    add_efficiency(rows)
    write_csv(rows, args.out / "scaling.csv")
    for r in rows:
        r["point"] = f"{r['mode']} {r['nodes']}x{r['per_node']}"
    print("\n" + text_table(rows, SWEEP_COLUMNS))
    print(f"\nwrote {args.out / 'scaling.csv'}")
    if not args.no_plots:
        for mode in args.mode:
            path = args.out / f"scaling_{mode}.png"
            if plot(rows, mode, path):
                print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
