"""Training entry point: `torchrun --nproc_per_node=4 -m launcher.train --config FILE [--a.b=v]`.

Also `moe-train ...` (console script), `srun python -m launcher.train ...` (Slurm without
torchrun) and plain `python -m launcher.train ...` (a world of one).

Order matters: everything that can be wrong with the input (config keys and types, layout
against WORLD_SIZE, data paths, the data itself) is checked on every rank BEFORE the process
group exists, so a bad input exits with its message and code 2 on every rank, never a hang.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.config import JobConfig, describe_schema, load_config
from launcher.env import DistEnv, choose_backend, device_for, init_distributed, read_env, shutdown_distributed
from model.errors import ConfigError
from model.transformer import TransformerLM
from parallel.checkpoint import load_full_checkpoint
from parallel.expert_parallel import apply_expert_parallel
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import Layout, Topology
from trainer.data import Corpus, RankData, load_corpus, rank_data
from trainer.loop import Trainer

USAGE = """usage: torchrun --nproc_per_node=N -m launcher.train [--config FILE] [--section.key=value ...]

Every key below can be set in the YAML file (section: {key: value}) or overridden on the
command line; later overrides win. Unknown keys are rejected.
"""


def prepare(argv: list[str], env: DistEnv) -> tuple[JobConfig, Layout, str, Corpus, RankData]:
    """All input checks, no collectives: config, layout, backend, run dir, data."""
    job = load_config(argv)
    layout = job.validate(env.world_size)
    backend = choose_backend(job.parallel.backend)
    check_writable(Path(job.logging.run_dir))
    corpus = load_corpus(job.data)
    data = rank_data(corpus, job.train, job.model.vocab_size, layout.coords(env.rank)["dp"], layout.dp)
    return job, layout, backend, corpus, data


def check_writable(run_dir: Path) -> None:
    """Every rank creates the run dir (idempotent), so an unusable one is the same clear
    error on every rank before any collective, not an exception on rank 0 and a hang."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"logging.run_dir ({run_dir}) cannot be created: {exc.strerror}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"logging.run_dir ({run_dir}) is not writable")


def build_model(job: JobConfig, topology: Topology, device: torch.device) -> TransformerLM:
    """The same seed on every rank gives the same full model; tp and ep then keep slices."""
    torch.manual_seed(job.train.seed)
    model = TransformerLM(job.model, job.moe)
    if job.checkpoint.init_from:
        load_full_checkpoint(job.checkpoint.init_from, model)
    apply_tensor_parallel(model, topology)
    apply_expert_parallel(model, topology)
    return model.to(device)


def run(argv: list[str]) -> dict:
    env = read_env()
    job, layout, backend, corpus, data = prepare(argv, env)
    if job.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = Path(job.logging.run_dir)
    if env.rank == 0:
        (run_dir / "config.yaml").write_text(job.to_yaml())
        print(f"resolved config (saved to {run_dir / 'config.yaml'}):\n{job.to_yaml()}")
        print(f"launch: {env.launcher}, backend {backend}, {corpus.description}")
    init_distributed(env, backend, job.parallel.timeout_s)
    try:
        topology = Topology.create(layout)
        if env.rank == 0:
            print(f"topology: {topology.describe()}")
        device = device_for(backend, env.local_rank)
        model = build_model(job, topology, device)
        summary = Trainer(job, model, topology, device, data, env.local_rank).fit()
        if env.rank == 0:
            print(f"done: {summary['steps']} steps in {summary['elapsed_s']:.1f}s, "
                  f"final eval loss {summary['final_eval_loss']:.4f}, "
                  f"{summary['tokens_per_s']:.0f} tokens/s; run dir {run_dir}")
        dist.barrier()  # nobody tears the group down while a peer is still in a collective
        return summary
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n" + describe_schema())
        return 0
    try:
        run(argv)
    except ConfigError as exc:
        print(f"[rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))}] "
              f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
