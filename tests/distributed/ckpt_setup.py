"""A small trainer built the way launcher/train.py builds it, for checkpoint tests in workers."""

from __future__ import annotations

import torch
import torch.distributed as dist

from launcher.config import load_config
from launcher.train import build_model
from parallel.topology import Topology
from trainer.data import Corpus, rank_data
from trainer.loop import Trainer, _Window

# 2 layers, 4 experts of hidden 16 and a shared expert of hidden 24 (split by tp like a dense
# FFN); 8 sequences of 16 tokens per step at every layout below (dp x micro_batch_size = 8).
SMALL = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=4", "--model.ffn_hidden=64",
         "--model.max_seq_len=16", "--moe.num_experts=4", "--moe.expert_hidden=16",
         "--moe.shared_expert_hidden=24",
         "--train.seq_len=16", "--train.warmup_steps=2", "--train.steps=10",
         "--train.eval_batches=1", "--logging.tensorboard=false", "--logging.progress=false"]

LAYOUTS = {  # name -> overrides; world size is dp x tp
    "dp4_ep4": ["--parallel.dp=4", "--parallel.ep=4", "--train.micro_batch_size=2"],
    "dp4_ep2": ["--parallel.dp=4", "--parallel.ep=2", "--train.micro_batch_size=2"],
    "dp4_ep1": ["--parallel.dp=4", "--parallel.ep=1", "--train.micro_batch_size=2"],
    "dp2_ep2": ["--parallel.dp=2", "--parallel.ep=2", "--train.micro_batch_size=4"],
    "dp4_ep2_zero2": ["--parallel.dp=4", "--parallel.ep=2", "--parallel.zero_stage=2",
                      "--train.micro_batch_size=2"],
    "dp2_ep2_zero1": ["--parallel.dp=2", "--parallel.ep=2", "--parallel.zero_stage=1",
                      "--train.micro_batch_size=4"],
    "dp4_ep4_zero1": ["--parallel.dp=4", "--parallel.ep=4", "--parallel.zero_stage=1",
                      "--train.micro_batch_size=2"],
    "dp2_tp2_ep2_zero2": ["--parallel.dp=2", "--parallel.tp=2", "--parallel.ep=2",
                          "--parallel.zero_stage=2", "--train.micro_batch_size=4"],
    "dp2_tp2_ep2": ["--parallel.dp=2", "--parallel.tp=2", "--parallel.ep=2",
                    "--train.micro_batch_size=4"],
    # moe.bias_update_rate: the routers' expert bias (a buffer) moves every step
    "dp4_ep4_bias": ["--parallel.dp=4", "--parallel.ep=4", "--train.micro_batch_size=2",
                     "--moe.bias_update_rate=0.01"],
    "dp2_tp2_ep2_bias": ["--parallel.dp=2", "--parallel.tp=2", "--parallel.ep=2",
                         "--train.micro_batch_size=4", "--moe.bias_update_rate=0.01"],
    "dp2_tp2_ep2_zero2_bias": ["--parallel.dp=2", "--parallel.tp=2", "--parallel.ep=2",
                               "--parallel.zero_stage=2", "--train.micro_batch_size=4",
                               "--moe.bias_update_rate=0.01"],
    "dp4_ep2_deepspeed": ["--parallel.dp=4", "--parallel.ep=2", "--train.micro_batch_size=2",
                          "--moe.backend=deepspeed", "--moe.drop_tokens=false", "--moe.use_rts=false"],
}


def world_of(layout: str) -> int:
    args = dict(a.removeprefix("--").split("=") for a in LAYOUTS[layout])
    return int(args["parallel.dp"]) * int(args.get("parallel.tp", 1))


def make_trainer(rank: int, run_dir: str, layout: str, *extra: str) -> Trainer:
    job = load_config(["--config", "configs/cpu_tiny.yaml", *SMALL, *LAYOUTS[layout],
                       f"--logging.run_dir={run_dir}", *extra])
    lay = job.validate(dist.get_world_size())
    tokens = torch.randint(0, 256, (40_000,), generator=torch.Generator().manual_seed(0))
    corpus = Corpus(tokens.to(torch.uint8), tokens[:4000].to(torch.uint8), "random", 256)
    data = rank_data(corpus, job.train, 256, lay.coords(rank)["dp"], lay.dp)
    topo = Topology.create(lay)
    model = build_model(job, topo, torch.device("cpu"))
    return Trainer(job, model, topo, torch.device("cpu"), data, local_rank=rank)


def step_losses(trainer: Trainer) -> list[float]:
    """Take one training step; its (lm, aux, z) losses averaged over dp. Collective."""
    window = _Window()
    trainer.train_step(window)
    losses = window.losses.clone()
    dist.all_reduce(losses, group=trainer.topology.groups["dp"])
    return (losses / trainer.topology.size("dp")).tolist()


def resume_and_resave(rank: int, ckpt_dir: str, run_dir: str, layout: str, *extra: str) -> tuple[str, list[float]]:
    """A trainer at `layout` resumed from the checkpoint in `ckpt_dir`, saved again straight
    away, then one step: (the new checkpoint's path, that step's losses). Collective."""
    from checkpoint.reader import resolve

    ckpt, _ = resolve(ckpt_dir, run_dir)
    trainer = make_trainer(rank, run_dir, layout, *extra)
    trainer.resume(ckpt)
    return str(trainer.save()), step_losses(trainer)
