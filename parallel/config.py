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
    gradients. 3 is refused: DeepSpeed's ZeRO-3 does not support MoE."""
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
        if self.zero_stage == 3:
            raise ConfigError(
                "parallel.zero_stage (3) is not available: DeepSpeed's ZeRO-3 refuses MoE "
                "models (\"Native DeepSpeed MoE is not supported with ZeRO Stage 3\"); use 1 or 2"
            )
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"parallel.zero_stage ({self.zero_stage}) must be 0, 1 or 2")
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s ({self.timeout_s}) must be > 0")
