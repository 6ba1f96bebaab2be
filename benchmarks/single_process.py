"""A launcher config's model in a world of one, as the trainer builds and runs it: the shared
set-up of benchmarks/profile_step.py and benchmarks/activation_memory.py."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# A tiny model for --smoke runs on CPU (on top of configs/cpu_tiny.yaml).
SMOKE_ARGS = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--moe.expert_hidden=32",
              "--train.micro_batch_size=2", "--train.seq_len=32", "--parallel.dp=1", "--parallel.ep=1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --smoke and, after `--`, launcher.train overrides."""
    parser.add_argument("--config", default=None, help="default configs/gpu_moe_1b.yaml (smoke: cpu_tiny)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more launcher.train overrides")


def launcher_args(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(the config file, its overrides) from add_arguments' arguments."""
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    config = args.config or ("configs/cpu_tiny.yaml" if args.smoke else "configs/gpu_moe_1b.yaml")
    return config, (SMOKE_ARGS + extra if args.smoke else extra)


@dataclass
class Setup:
    job: object  # launcher.config.JobConfig
    topology: object  # parallel.topology.Topology
    device: torch.device
    dtype: torch.dtype
    """The compute dtype (trainer.optim.compute_dtype)."""
    autocast_bf16: bool
    """Whether the trainer would run the forward under bf16 autocast (trainer.optim.uses_autocast)."""

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

    def batch(self, seed: int = 0) -> torch.Tensor:
        """(micro_batch_size, seq_len + 1) random token ids: inputs [:, :-1], targets [:, 1:]."""
        train = self.job.train
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.job.model.vocab_size, (train.micro_batch_size, train.seq_len + 1),
                               generator=gen)
        return tokens.to(self.device)

    def model(self):
        """The config's model as the trainer builds it (launcher.train.build_model: the seed,
        train.recompute, train.compile), on the device."""
        from launcher.train import build_model

        return build_model(self.job, self.topology, self.device)


@contextlib.contextmanager
def single_process(argv: list[str], smoke: bool, port: int) -> Iterator[Setup]:
    """`argv`: launcher.train arguments (--config ... and overrides). CUDA device 0 when there
    is one and not `smoke`, else the CPU; a gloo or nccl group of one around the block."""
    from launcher.config import load_config
    from launcher.env import DistEnv, init_distributed, shutdown_distributed
    from parallel.topology import Topology
    from trainer.optim import compute_dtype, uses_autocast

    job = load_config(argv)
    layout = job.validate(1)
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not smoke else torch.device("cpu")
    init_distributed(DistEnv(0, 0, 1, 1, "127.0.0.1", port, "single"),
                     "nccl" if device.type == "cuda" else "gloo", 300)
    try:
        dtype = compute_dtype(job.train.precision, device)
        yield Setup(job, Topology.create(layout), device, dtype, uses_autocast(job.parallel.zero_stage, dtype))
    finally:
        shutdown_distributed()
