"""AdamW with decoupled weight decay on matrices only, the warmup + cosine schedule, and the
three ways one optimizer step is taken: our own reductions (zero_stage 0), DeepSpeed's ZeRO
engine (stages 1 and 2, parallel/zero.py) or FSDP2's sharded parameters (stage 3,
parallel/fsdp.py). Each is a `Stepper`, so there is one loop."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from parallel.data_parallel import clip_gradients_, reduce_gradients
from parallel.expert_parallel import split_parameters
from parallel.topology import Topology
from trainer.config import TrainConfig


def param_groups(params: list[nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """Matrices (incl. embeddings and stacked experts) decay; 1-D norm gains do not.
    Groups are named: DeepSpeed splits each further into dense and expert groups by name."""
    return [
        {"name": "decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(groups: list[dict] | list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    if groups and isinstance(groups[0], nn.Parameter):
        groups = param_groups(groups, cfg)
    params = [p for g in groups for p in g["params"]]
    # On CUDA, the fused kernel: a few launches per parameter group instead of about eight per
    # tensor, for hundreds of tensors.
    # Elsewhere, one tensor at a time (foreach=False). Either way each element gets the same
    # arithmetic however the tensors are grouped, so every layout updates identically.
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             foreach=None if fused else False, fused=fused or None)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """train.precision on this device: auto is bf16 on CUDA (its tensor cores' format) and fp32
    elsewhere (a CPU gains little from bf16 and loses accuracy)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def uses_autocast(zero_stage: int, dtype: torch.dtype) -> bool:
    """Whether the forward runs under bf16 autocast: at zero_stage 0 a bf16 compute dtype is
    autocast over fp32 weights; ZeRO (stages 1, 2) casts the model to bf16 itself, and at
    stage 3 FSDP gathers bf16 copies of the fp32 shards (parallel.fsdp.mixed_precision)."""
    return zero_stage == 0 and dtype == torch.bfloat16


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr
    over warmup_steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


class Stepper(Protocol):
    """One optimizer step as the loop sees it: begin(lr), then per micro-batch forward and
    backward, then finish (reduce and clip: returns the pre-clip global gradient norm), then,
    if the step is finite on every rank (trainer/divergence.py), update (apply it)."""

    optimizer: torch.optim.Optimizer
    zero_stage: int  # 0, 3: `optimizer` is torch's AdamW (3: on DTensor shards); 1, 2: DeepSpeed's

    def begin(self, lr: float) -> None: ...

    def forward(self, x: torch.Tensor, y: torch.Tensor): ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def finish(self) -> torch.Tensor: ...

    def update(self) -> None: ...


class PlainStepper:
    """zero_stage 0: every rank keeps the full optimizer state of its own parameters."""

    def __init__(self, model: nn.Module, topology: Topology, cfg: TrainConfig):
        self.model, self.topology, self.cfg, self.zero_stage = model, topology, cfg, 0
        self.dense, self.expert = split_parameters(model)
        self.optimizer = build_optimizer(self.dense + self.expert, cfg)

    def begin(self, lr: float) -> None:
        # Gradients are cleared here, not after the update, so they stay readable after a step.
        self.optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, x, y):
        return self.model(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def finish(self) -> torch.Tensor:
        reduce_gradients(self.dense, self.expert, self.topology)
        return clip_gradients_(self.dense, self.expert, self.cfg.grad_clip, self.topology)

    def update(self) -> None:
        self.optimizer.step()


def build_stepper(model: nn.Module, topology: Topology, cfg: TrainConfig, zero_stage: int,
                  local_rank: int, dtype: torch.dtype = torch.float32,
                  reduce_every_micro_batch: bool = False) -> Stepper:
    """`dtype` is the compute dtype (compute_dtype): zero_stage 0 leaves it to the caller's
    autocast, ZeRO makes the model bf16 itself when it is bf16, and at stage 3 the model
    comes sharded with its precision policy (launcher.train.build_model).
    `reduce_every_micro_batch`: parallel.fsdp_reduce_every_micro_batch (stage 3)."""
    if zero_stage == 0:
        return PlainStepper(model, topology, cfg)
    if zero_stage == 3:
        from parallel.fsdp import FsdpStepper

        return FsdpStepper(model, topology, lambda params: build_optimizer(params, cfg),
                           grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                           reduce_every_micro_batch=reduce_every_micro_batch)
    from parallel.zero import ZeroStepper  # imports DeepSpeed only when it is used

    return ZeroStepper(
        model, topology, param_groups(list(model.parameters()), cfg),
        make_optimizer=lambda groups: build_optimizer(groups, cfg), stage=zero_stage,
        micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
        grad_clip=cfg.grad_clip, local_rank=local_rank, bf16=dtype == torch.bfloat16,
    )
