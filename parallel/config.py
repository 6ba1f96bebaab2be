"""Typed schema of the parallel layout and the distributed backend."""

from __future__ import annotations

from dataclasses import dataclass

from model.errors import ConfigError, check_choice, check_positive

DIST_BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    """How the world of ranks is split. Dense layout: world = dp x tp, tp ranks adjacent.

    Expert parallelism is carved out of data parallelism: the dp ranks of one tp column are
    cut into groups of ep consecutive ranks that hold disjoint slices of the experts; all ranks
    holding the same slice form the expert-data-parallel group (size world / ep). See
    parallel/topology.py for the rank order.
    """

    dp: int | None = None
    """Data-parallel degree; null = WORLD_SIZE / tp. When set, dp x tp must equal WORLD_SIZE."""
    tp: int = 1
    """Tensor-parallel degree: attention heads and dense FFN hidden units split over tp ranks."""
    ep: int = 1
    """Expert-parallel degree; must divide dp and moe.num_experts."""
    zero_stage: int = 0
    """0: every rank keeps the full optimizer state of its parameters (our own reductions);
    1: DeepSpeed ZeRO shards the optimizer state over dp (experts: over edp); 2: also the
    gradients; 3: PyTorch FSDP2 shards the parameters too, with their gradients and optimizer
    state (dense over dp, experts over edp), gathering one block at a time."""
    fsdp_reduce_every_micro_batch: bool = False
    """zero_stage 3 with train.grad_accum > 1: reduce-scatter the gradients after every
    micro-batch, keeping 1/dp of them (experts: 1/edp) between micro-batches, at grad_accum
    times the gradient traffic. Off: only the last micro-batch reduces; until then each rank
    holds its whole (tp/ep-local) gradient in fp32, as at zero_stage 0."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, else gloo), gloo or nccl."""
    timeout_s: float = 300.0
    """Collective timeout in seconds: a peer that never arrives becomes an error, not a hang."""

    def validate(self) -> None:
        if self.dp is not None:
            check_positive("parallel.dp", self.dp)
        check_positive("parallel.tp", self.tp)
        check_positive("parallel.ep", self.ep)
        check_choice("parallel.backend", self.backend, DIST_BACKENDS)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage ({self.zero_stage}) must be 0, 1, 2 or 3")
        if self.fsdp_reduce_every_micro_batch and self.zero_stage != 3:
            raise ConfigError(
                f"parallel.fsdp_reduce_every_micro_batch applies to parallel.zero_stage 3 "
                f"(FSDP), not {self.zero_stage}")
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s ({self.timeout_s}) must be > 0")
