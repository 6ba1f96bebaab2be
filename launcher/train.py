"""Training entry point: `torchrun --nproc_per_node=4 -m launcher.train --config FILE [--a.b=v]`.

Also `moe-run ...` (launcher/agent.py: torchrun's options, and the job's exit code), `moe-train
...` (console script), `srun python -m launcher.train ...` (Slurm without torchrun) and plain
`python -m launcher.train ...` (a world of one).

Order matters:
1. Everything that can be wrong with the input (config keys and types, layout against
   WORLD_SIZE, data paths, the data itself, the checkpoint to load) is checked on every rank
   BEFORE the process group exists: a bad input exits with its code on every rank, never a hang.
2. The group exists; rank 0 locks the run dir (launcher/run_dir.py) before anything is written.
3. The checkpoint to load is chosen together; a run that already reached train.steps stops
   here, having written nothing.
4. Only then the resolved config, the placement, and training.
Exit codes: launcher/exit_codes.py.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint.hf.export import choose_family, export_checkpoint, open_run_checkpoint
from checkpoint.hf.start import HFStart, load_hf_weights, start_from_hf
from checkpoint.load import load_weights
from checkpoint.reader import Checkpoint
from checkpoint.compat import check_model_tokenizer
from checkpoint.select import Found, choose, find_checkpoints
from launcher import exit_codes
from launcher.config import JobConfig, describe_schema, load_config
from launcher.env import (
    DistEnv,
    check_moe_backend,
    choose_backend,
    device_for,
    gpu_index,
    init_distributed,
    node_of,
    read_env,
    set_cpu_threads,
    shutdown_distributed,
    start_heartbeat,
)
from launcher.run_dir import claim
from model.errors import ConfigError
from model.transformer import TransformerLM
from parallel.collectives import CollectiveError, all_gather_object, barrier
from parallel.expert_parallel import apply_expert_parallel
from parallel.fsdp import apply_fully_shard, mixed_precision
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import Layout, Topology
from planner.hook import describe as describe_plan
from planner.hook import run_plan
from trainer.data import Corpus, RankData, load_corpus, rank_data
from trainer.loop import Trainer
from trainer.optim import compute_dtype

USAGE = """usage: torchrun --nproc_per_node=N -m launcher.train [--config FILE] [--section.key=value ...]

Every key below can be set in the YAML file (section: {key: value}) or overridden on the
command line; later overrides win. Unknown keys are rejected. With --config, the defaults
shown are that file's values.
"""


@dataclass
class Prepared:
    """What rank's checks of the input produced, before any collective."""

    job: JobConfig
    layout: Layout
    backend: str
    corpus: Corpus
    data: RankData
    found: Found  # checkpoint.resume's
    init: Found  # checkpoint.init_from's (our checkpoint; an hf: directory is `hf`)
    hf: HFStart | None = None  # checkpoint.init_from=hf:PATH, opened and checked


def prepare(argv: list[str], env: DistEnv) -> Prepared:
    """All input checks, no collectives: config, layout, backend, run dir, the checkpoint to
    resume or start from (opened, and checked against the run), data."""
    job = load_config(argv)
    hf = start_from_hf(job)  # fills the model and MoE sections from config.json first
    layout = job.validate(env.world_size)
    backend = choose_backend(job.parallel.backend)
    if backend == "nccl":
        gpu_index(env.local_rank)  # more ranks on this node than visible GPUs: refused here
    check_moe_backend(job.moe.backend, backend)
    run_dir = Path(job.logging.run_dir)
    check_writable(run_dir)
    corpus = load_corpus(job.data)
    found = find_checkpoints(job, run_dir, corpus)
    init = find_checkpoints(job, run_dir, corpus, init=True)
    if hf is not None:
        check_model_tokenizer(hf.hf.tokenizer_sha256, str(hf.path), corpus)
    if job.checkpoint.export_hf:
        check_export(job, hf)
    if job.checkpoint.resume and job.checkpoint.resume != "auto" and found.checkpoints:
        check_steps(found.checkpoints[0], job)
    data = rank_data(corpus, job.train, job.model.vocab_size, layout.coords(env.rank)["dp"], layout.dp)
    return Prepared(job, layout, backend, corpus, data, found, init, hf)


def check_export(job: JobConfig, hf: HFStart | None) -> None:
    """checkpoint.export_hf is refused now, not after training: an export directory that
    holds something, a model no HF family can express."""
    out = Path(job.checkpoint.export_hf)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"checkpoint.export_hf ({out}) exists and is not empty")
    choose_family(job.model, job.moe, hf.hf.config.get("model_type") if hf else None)


def check_writable(run_dir: Path) -> None:
    """Every rank creates the run dir (idempotent), so an unusable one is the same clear
    error on every rank before any collective, not an exception on rank 0 and a hang."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"logging.run_dir ({run_dir}) cannot be created: {exc.strerror}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"logging.run_dir ({run_dir}) is not writable")


def check_steps(ckpt: Checkpoint, job: JobConfig) -> None:
    """A resumed run must end at or after the step it resumes from."""
    if ckpt.step > job.train.steps:
        raise ConfigError(
            f"train.steps ({job.train.steps}) is below the step of the checkpoint to resume, "
            f"{ckpt.path} ({ckpt.step}): a resumed run continues to train.steps. Set "
            f"--train.steps={ckpt.step} or more (the cosine schedule is a function of it), or "
            f"start from its weights with --checkpoint.init_from={ckpt.path}")


def build_model(job: JobConfig, topology: Topology, device: torch.device,
                init_from: Checkpoint | HFStart | None = None) -> TransformerLM:
    """The same seed on every rank gives the same full model; tp and ep then keep slices, and
    at zero_stage 3 FSDP shards those over dp (experts: edp) on the device. Our checkpoints
    fill the whole model before the transforms; an HF directory fills each rank's slices after
    them, before FSDP (collective)."""
    torch.manual_seed(job.train.seed)
    model = TransformerLM(job.model, job.moe)
    if isinstance(init_from, Checkpoint):
        for note in load_weights(init_from, model):
            if topology.rank == 0:
                print(f"init_from: {note}", flush=True)
    apply_tensor_parallel(model, topology, compiled=job.train.compile)
    apply_expert_parallel(model, topology)
    if isinstance(init_from, HFStart):
        load_hf_weights(init_from, model, topology)
    model.set_recompute(job.train.recompute)
    if job.train.compile:
        model.compile_modules()
    model = model.to(device)
    if job.parallel.zero_stage == 3:
        apply_fully_shard(model, topology, mixed_precision(compute_dtype(job.train.precision, device)))
    return model


def run(argv: list[str]) -> dict:
    env = read_env()
    p = prepare(argv, env)
    job, run_dir = p.job, Path(p.job.logging.run_dir)
    threads = set_cpu_threads(p.backend, env)
    if job.train.deterministic:
        torch.use_deterministic_algorithms(True)
    init_distributed(env, p.backend, job.parallel.timeout_s)
    heartbeat = start_heartbeat(env, job.parallel.timeout_s)
    lock = None
    try:
        topology = Topology.create(p.layout, job.parallel.timeout_s)
        lock = claim(run_dir, env.rank, bool(job.checkpoint.resume), job.logging.start_over)
        ckpt = choose(p.found, job, env.rank, env.world_size) if job.checkpoint.resume else None
        if ckpt is not None:
            check_steps(ckpt, job)
            if ckpt.step == job.train.steps:
                if env.rank == 0:
                    print(f"run {run_dir} already reached train.steps ({job.train.steps}): its "
                          f"checkpoint {ckpt.path} is final; nothing to do", flush=True)
                return {"steps": ckpt.step, "steps_run": 0, "finished_before": True}
        if env.rank == 0:
            (run_dir / "config.yaml").write_text(job.to_yaml())
            print(f"resolved config (saved to {run_dir / 'config.yaml'}):\n{job.to_yaml()}")
            print(f"launch: {env.launcher}, backend {p.backend}, {threads}; {p.corpus.description}")
            print(f"topology: {topology.describe()}")
        report_placement(env, run_dir)
        device = device_for(p.backend, env.local_rank)
        # init_from starts the run unless resume=auto found a checkpoint of it to continue.
        init = None if ckpt is not None else p.hf or choose(p.init, job, env.rank, env.world_size)
        model = build_model(job, topology, device, init)
        if env.rank == 0 and init is not None:
            where = (f"{p.hf.path} ({p.hf.hf.config['model_type']})" if p.hf
                     else f"{init.path} (step {init.step})")
            print(f"weights from {where}; optimizer and step start fresh")
        trainer = Trainer(job, model, topology, device, p.data, env.local_rank)
        # Where the weights came from goes into every checkpoint (export, the tokenizer check).
        trainer.model_source = (p.hf.hf.record() if p.hf else
                                init.meta.get("model_source") if init is not None else None)
        if env.rank == 0:
            compiled = ", torch.compile per module" if job.train.compile else ""
            recompute = (f", recompute {job.train.recompute} in backward"
                         if job.train.recompute != "none" else "")
            print(f"device: {device}, compute {trainer.precision_label()}{compiled}{recompute}")
            trainer.plan = run_plan(job, topology.layout.world_size, device.type)
            print(describe_plan(trainer.plan), flush=True)
        if ckpt is not None:
            trainer.resume(ckpt)
        summary = trainer.fit()
        if env.rank == 0:
            print(done_message(summary, run_dir), flush=True)
        barrier()  # nobody tears the group down while a peer is still in a collective
    except CollectiveError as exc:
        silent = heartbeat.silent_ranks() if heartbeat else None
        raise CollectiveError(f"{exc}\n{silent}" if silent else str(exc)) from None
    finally:
        if heartbeat:
            heartbeat.stop()
        if lock is not None:
            lock.release()
        shutdown_distributed()
    if job.checkpoint.export_hf and env.rank == 0:  # one process reads the final checkpoint
        out = export_checkpoint(open_run_checkpoint(summary.get("checkpoint") or run_dir / "checkpoints"),
                                job.checkpoint.export_hf,
                                progress=job.logging.progress)
        print(f"exported the final weights as an HF directory: {out}", flush=True)
    return summary


def done_message(summary: dict, run_dir: Path) -> str:
    ran = summary["steps_run"]
    where = (f"{ran} steps (step {summary['start_step']} -> {summary['steps']})"
             if summary["start_step"] else f"{ran} steps")
    loss = summary["final_eval_loss"]
    mfu = f", MFU {summary['mfu']:.3f}" if summary.get("mfu") is not None else ""
    skipped = f", {len(summary['skipped_steps'])} non-finite steps skipped" if summary["skipped_steps"] else ""
    return (f"done: {where} in {summary['elapsed_s']:.1f}s, final eval loss "
            f"{'-' if loss is None else f'{loss:.4f}'}, {summary['tokens_per_s']:.0f} tokens/s "
            f"overall, {summary['train_tokens_per_s'] or 0:.0f} in steady training steps{mfu}, "
            f"peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB "
            f"({summary['peak_memory_kind']}, busiest rank){skipped}; run dir {run_dir}")


def report_placement(env: DistEnv, run_dir: Path) -> None:
    """Where every rank runs (node, local rank, host, pid): printed by rank 0 and kept in
    placement.json, so a launch across nodes can be checked. Collective."""
    here = {"rank": env.rank, "node": node_of(), "local_rank": env.local_rank,
            "host": socket.gethostname(), "pid": os.getpid()}
    everyone = all_gather_object(here)
    if env.rank == 0:
        nodes: dict[int, list[int]] = {}
        for r in everyone:
            nodes.setdefault(r["node"], []).append(r["rank"])
        print("placement: " + "; ".join(f"node {n}: ranks {ranks}" for n, ranks in sorted(nodes.items())))
        (run_dir / "placement.json").write_text(json.dumps(everyone, indent=1))


def report(rank: int, code: int, exc: BaseException) -> str:
    """Print how the run ended; returns the message for the exit record. Input errors are
    the same on every rank: rank 0 says them once, and the other ranks only when no launcher
    collects the exit records (it then shows the ones that differ)."""
    message = f"{type(exc).__name__}: {exc}" if code == exit_codes.UNEXPECTED else str(exc)
    quiet = rank != 0 and os.environ.get(exit_codes.EXIT_DIR_ENV)
    if code == exit_codes.UNEXPECTED:
        traceback.print_exc()
    elif code in (exit_codes.PREEMPTED, exit_codes.INTERRUPTED):
        if rank == 0:
            print(f"{exit_codes.MEANING[code]}: {exc}; exit code {code} (then "
                  "--checkpoint.resume=auto continues)", flush=True)
    elif not quiet:
        prefix = "" if rank == 0 else f"[rank {rank}] "
        print(f"{prefix}{exit_codes.MEANING[code]}: {message} (exit code {code})", file=sys.stderr, flush=True)
    return message


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        try:
            job = load_config([a for a in argv if a not in ("-h", "--help")])
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return exit_codes.CONFIG
        print(USAGE + "\n" + describe_schema(job))
        return exit_codes.OK
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    code, message = exit_codes.OK, None
    try:
        run(argv)
    except BaseException as exc:  # noqa: BLE001 - every ending gets its code and its record
        code = exit_codes.code_for(exc)
        if isinstance(exc, KeyboardInterrupt):
            code, exc = exit_codes.INTERRUPTED, KeyboardInterrupt("interrupted before training started")
        message = report(rank, code, exc)
    exit_codes.write_record(rank, code, message)
    return code


if __name__ == "__main__":
    sys.exit(main())
