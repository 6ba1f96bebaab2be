"""Training entry point: `torchrun --nproc_per_node=4 -m launcher.train --config FILE [--a.b=v]`.

Also `moe-train ...` (console script), `srun python -m launcher.train ...` (Slurm without
torchrun) and plain `python -m launcher.train ...` (a world of one).

Order matters: everything that can be wrong with the input (config keys and types, layout
against WORLD_SIZE, data paths, the data itself) is checked on every rank BEFORE the process
group exists, so a bad input exits with its message and code 2 on every rank, never a hang.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch

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
    shutdown_distributed,
)
from model.config import ARCHITECTURE
from model.errors import ConfigError
from model.transformer import TransformerLM
from parallel.checkpoint import agree, load_weights
from parallel.checkpoint_store import (
    Checkpoint,
    CheckpointError,
    candidates,
    resolve,
    skipped_message,
)
from parallel.collectives import (
    CollectiveError,
    all_gather_object,
    barrier,
    broadcast_object,
)
from parallel.expert_parallel import apply_expert_parallel
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import Topology
from trainer.data import load_corpus, rank_data
from trainer.loop import Trainer
from trainer.signals import PREEMPTED_EXIT_CODE, Preempted

# A collective could not complete (a peer died or stalled past parallel.timeout_s).
COLLECTIVE_FAILED_EXIT_CODE = 3

USAGE = """usage: torchrun --nproc_per_node=N -m launcher.train [--config FILE] [--section.key=value ...]

Every key below can be set in the YAML file (section: {key: value}) or overridden on the
command line; later overrides win. Unknown keys are rejected.
"""


# What fixes the order of the training samples (trainer/data.py): a resumed run must keep it.
# (micro_batch_size, grad_accum and dp may change: the position is counted in samples.)
DATA_ORDER = {"train": ("seq_len", "seed"),
              "data": ("source", "path", "text_glob", "token_dtype", "holdout_fraction")}


def prepare(argv: list[str], env: DistEnv):
    """All input checks, no collectives: config, layout, backend, run dir, data, and the
    checkpoints to resume or start from (opened, and checked against the model config)."""
    job = load_config(argv)
    layout = job.validate(env.world_size)
    backend = choose_backend(job.parallel.backend)
    if backend == "nccl":
        gpu_index(env.local_rank)  # more ranks on this node than visible GPUs: refused here
    check_moe_backend(job.moe.backend, backend)
    run_dir = Path(job.logging.run_dir)
    check_writable(run_dir)
    ckpts = find_checkpoints(job, run_dir, env.rank == 0)
    corpus = load_corpus(job.data)
    data = rank_data(corpus, job.train, job.model.vocab_size, layout.coords(env.rank)["dp"], layout.dp)
    return job, layout, backend, corpus, data, ckpts


def find_checkpoints(job: JobConfig, run_dir: Path, verbose: bool) -> list[Checkpoint]:
    """The checkpoint named by checkpoint.resume or init_from, opened and checked against the
    model config. For "auto": every committed checkpoint of the run dir that opens, newest
    first; the job then checks their files' checksums together (choose_verified)."""
    ck = job.checkpoint
    spec = ck.resume or ck.init_from
    if spec is None:
        return []
    if spec == "auto":
        found, skipped = candidates(run_dir / "checkpoints")
        if verbose:
            for line in skipped:
                print(line, flush=True)
    else:
        found = [resolve(spec, run_dir / "checkpoints")[0]]
    if found:
        check_fits(found[0], job)
    return found


def choose_verified(found: list[Checkpoint], job: JobConfig, env: DistEnv) -> Checkpoint | None:
    """resume=auto: the newest of `found` whose every file matches its checksum. Each rank
    hashes 1/world of the files and the verdicts are gathered, so the job reads a candidate
    once in all, not once per rank (a 1,000-rank job would read it 1,000 times). Collective.

    The ranks first agree on the candidates (each listed its own run dir in prepare()): one
    collective per candidate needs the same list everywhere, and a run dir that is not shared
    or a save landing between listings would make them differ."""
    listed = [(str(c.path), c.step) for c in found]
    first = _first(listed)  # once: a second broadcast on mismatching ranks only would hang
    agree(None if listed == first else f"found checkpoints {listed}, rank 0 found {first} "
          "(is the run dir on a shared file system?)", "choosing a checkpoint")
    for ckpt in found:
        problems = [p for share in all_gather_object(ckpt.check_share(env.rank, env.world_size))
                    for p in share]
        if not problems:
            ckpt.trust()  # checked by the job: ranks do not hash the files again on load
            check_fits(ckpt, job)  # an older one may not fit; every rank raises the same
            return ckpt
        if env.rank == 0:
            print(skipped_message(ckpt.path, problems), flush=True)
    if env.rank == 0:
        print(f"checkpoint.resume=auto: no committed checkpoint in "
              f"{Path(job.logging.run_dir) / 'checkpoints'}, starting at step 0", flush=True)
    return None


def _first_difference(saved: dict, job: JobConfig, fields: dict, default_ours: bool):
    """(section.key, checkpoint's value, ours) for the first of `fields` that differ, or None.
    A key the checkpoint lacks (older checkpoints did not record it) counts as ours with
    `default_ours`, else as the field's default (which reproduces what came before it, e.g.
    moe.shared_expert_hidden 0)."""
    for section, keys in fields.items():
        ours = getattr(job, section)
        for key in keys:
            missing = getattr(ours, key) if default_ours else getattr(type(ours), key, None)
            theirs = saved.get(section, {}).get(key, missing)
            if theirs != getattr(ours, key):
                return f"{section}.{key}", theirs, getattr(ours, key)
    return None


def check_fits(ckpt: Checkpoint, job: JobConfig) -> None:
    """The checkpoint's model must be this run's model; a resumed run must also read the same
    data in the same order, or its saved data position (samples seen) would point elsewhere.
    Raises on every rank alike (each reads the same metadata), before any collective."""
    saved = ckpt.meta.get("config", {})
    diff = _first_difference(saved, job, ARCHITECTURE, default_ours=False)
    if diff:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run: {diff[0]} is "
                              f"{diff[1]} in the checkpoint and {diff[2]} here")
    theirs, ours = saved.get("moe", {}).get("bias_update_rate", 0.0), job.moe.bias_update_rate
    if job.checkpoint.resume and (theirs > 0) != (ours > 0):
        # The rate may change; the bias must not appear or vanish in a resumed run (init_from
        # may: a new bias starts at zero, an unused one is reported by load_weights).
        raise CheckpointError(
            f"cannot resume from {ckpt.path}: moe.bias_update_rate is {theirs} in the checkpoint "
            f"and {ours} here, so the routers' expert bias would "
            + ("be dropped (its routing would change)" if theirs > 0 else "be missing from it")
            + f"; --checkpoint.init_from={ckpt.path} starts from its weights instead")
    diff = _first_difference(saved, job, DATA_ORDER, default_ours=True) if job.checkpoint.resume else None
    if diff:
        raise CheckpointError(
            f"cannot resume from {ckpt.path}: {diff[0]} is {diff[1]} in the checkpoint and "
            f"{diff[2]} here, which changes the order of the training samples, so its data "
            f"position ({ckpt.meta.get('samples_seen')} samples seen) would not continue the "
            f"run. Keep the value, or start from its weights with --checkpoint.init_from="
            f"{ckpt.path} (fresh optimizer, step 0)")


def check_writable(run_dir: Path) -> None:
    """Every rank creates the run dir (idempotent), so an unusable one is the same clear
    error on every rank before any collective, not an exception on rank 0 and a hang."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"logging.run_dir ({run_dir}) cannot be created: {exc.strerror}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"logging.run_dir ({run_dir}) is not writable")


def build_model(job: JobConfig, topology: Topology, device: torch.device,
                init_from: Checkpoint | None = None) -> TransformerLM:
    """The same seed on every rank gives the same full model; tp and ep then keep slices."""
    torch.manual_seed(job.train.seed)
    model = TransformerLM(job.model, job.moe)
    if init_from is not None:
        for note in load_weights(init_from, model):
            if topology.rank == 0:
                print(f"init_from: {note}", flush=True)
    apply_tensor_parallel(model, topology, compiled=job.train.compile)
    apply_expert_parallel(model, topology)
    model.set_recompute(job.train.recompute)
    if job.train.compile:
        model.compile_modules()
    return model.to(device)


def run(argv: list[str]) -> dict:
    env = read_env()
    job, layout, backend, corpus, data, ckpts = prepare(argv, env)
    if job.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = Path(job.logging.run_dir)
    if env.rank == 0:
        (run_dir / "config.yaml").write_text(job.to_yaml())
        print(f"resolved config (saved to {run_dir / 'config.yaml'}):\n{job.to_yaml()}")
        print(f"launch: {env.launcher}, backend {backend}, {corpus.description}")
    init_distributed(env, backend, job.parallel.timeout_s)
    try:
        topology = Topology.create(layout, job.parallel.timeout_s)
        report_placement(env, run_dir)
        if env.rank == 0:
            print(f"topology: {topology.describe()}")
        device = device_for(backend, env.local_rank)
        auto = (job.checkpoint.resume or job.checkpoint.init_from) == "auto"
        ckpt = choose_verified(ckpts, job, env) if auto else (ckpts[0] if ckpts else None)
        found = (str(ckpt.path), ckpt.step) if ckpt else None
        first = _first(found)  # once: a second broadcast on mismatching ranks only would hang
        agree(None if found == first else f"chose checkpoint {found}, rank 0 chose {first} "
              "(is the run dir on a shared file system?)", "choosing a checkpoint")
        resume = ckpt if job.checkpoint.resume else None
        model = build_model(job, topology, device, ckpt if job.checkpoint.init_from else None)
        if env.rank == 0 and job.checkpoint.init_from:
            print(f"weights from {ckpt.path} (step {ckpt.step}); optimizer and step start fresh")
        trainer = Trainer(job, model, topology, device, data, env.local_rank)
        if env.rank == 0:
            compiled = ", torch.compile on the dense parts" if job.train.compile else ""
            recompute = (f", recompute {job.train.recompute} in backward"
                         if job.train.recompute != "none" else "")
            print(f"device: {device}, compute {trainer.precision_label()}{compiled}{recompute}")
        if resume is not None:
            trainer.resume(resume)
        summary = trainer.fit()
        if env.rank == 0:
            mfu = f", MFU {summary['mfu']:.3f}" if summary["mfu"] is not None else ""
            print(f"done: {summary['steps']} steps in {summary['elapsed_s']:.1f}s, "
                  f"final eval loss {summary['final_eval_loss']:.4f}, "
                  f"{summary['tokens_per_s']:.0f} tokens/s overall, "
                  f"{summary['train_tokens_per_s'] or 0:.0f} in steady training steps{mfu}, "
                  f"peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB "
                  f"({summary['peak_memory_kind']}, busiest rank); run dir {run_dir}")
        barrier()  # nobody tears the group down while a peer is still in a collective
        return summary
    finally:
        shutdown_distributed()


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


def _first(value):
    """Rank 0's value, on every rank. Collective."""
    return broadcast_object(value, src=0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n" + describe_schema())
        return 0
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    try:
        run(argv)
    except ConfigError as exc:
        print(f"[rank {rank}] config error: {exc}", file=sys.stderr)
        return 2
    except CollectiveError as exc:
        print(f"[rank {rank}] {exc}", file=sys.stderr, flush=True)
        return COLLECTIVE_FAILED_EXIT_CODE
    except Preempted as exc:
        if rank == "0":
            print(f"preempted: {exc}; exit code {PREEMPTED_EXIT_CODE} (requeue, then "
                  "--checkpoint.resume=auto continues)", flush=True)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
