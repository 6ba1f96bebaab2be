"""What a rank holds and computes, as sizes: the one place the planner reads the job config.

Every other planner module takes a `Shapes` and does arithmetic on it. Sizes are this rank's:
tensor parallelism splits heads and dense hidden units, expert parallelism the experts, and
each tp rank dispatches 1/tp of the tokens (model/moe/native_backend.py).

Routing imbalance: the rows an MoE layer's experts receive on a rank vary with the router.
`imbalance` is the described rank's received rows over the mean (1.0 = balanced); a plan
describes the busiest rank, whose factor is >= 1 (the tests also describe the others):
received = imbalance x sent rows, sent = (tokens / tp) x top_k on every rank. Only the rows an
expert-parallel rank receives are uneven; what it sends is fixed. A rank cannot receive more
than its ep group sends, so the factor is capped at ep (at ep 1 every row stays).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

from model.config import MoEConfig
from model.errors import ConfigError
from parallel.topology import Layout
from trainer.config import DataConfig

INT64, FP32 = 8, 4  # bytes of the int64 and fp32 elements the planner counts
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor, from train.precision, the stage and the device
    (trainer/optim.py: compute_dtype, uses_autocast)."""

    name: str
    """fp32; autocast (bf16 compute over fp32 weights, stage 0); bf16 (bf16 weights: DeepSpeed's
    bf16 mode at stages 1-2, FSDP's gathered bf16 copies at stage 3)."""
    param: int
    """A parameter as the model holds it (stage 3: the sharded fp32 master)."""
    grad: int
    """A gradient as the optimizer step reads it."""
    compute: int
    """Matmul inputs and outputs (the expert rows, attention)."""
    residual: int
    """The residual stream and the norms' inputs."""

    @property
    def autocast(self) -> bool:
        return self.name == "autocast"


def precision_of(train_precision: str, zero_stage: int, device: str) -> Precision:
    bf16 = train_precision == "bf16" or (train_precision == "auto" and device == "cuda")
    if not bf16:
        return Precision("fp32", 4, 4, 4, 4)
    if zero_stage == 0:
        return Precision("autocast", 4, 4, 2, 4)
    if zero_stage == 3:  # fp32 shards, bf16 gathered copies, fp32 reduce-scatter (parallel/fsdp.py)
        return Precision("bf16", 4, 4, 2, 2)
    return Precision("bf16", 2, 2, 2, 2)


@dataclass(frozen=True)
class Shapes:
    job: object  # launcher.config.JobConfig, validated
    layout: Layout
    gpus_per_node: int
    imbalance: float
    device: str
    precision: Precision

    @property
    def moe(self) -> MoEConfig:
        return self.job.moe

    @property
    def tokens(self) -> int:
        """T: tokens of one micro-batch on this rank (tp partners share them)."""
        return self.job.train.micro_batch_size * self.job.train.seq_len

    @property
    def slice_tokens(self) -> int:
        """t: the tokens this rank's MoE layers dispatch (T / tp)."""
        return self.tokens // self.layout.tp

    @property
    def sent_rows(self) -> int:
        """Rows one MoE layer sends to the experts: t x top_k, the same on every rank."""
        return self.slice_tokens * self.moe.top_k

    @property
    def recv_rows(self) -> float:
        """Rows one MoE layer's local experts receive on the busiest rank."""
        return self.sent_rows * min(self.imbalance, self.layout.ep)

    @property
    def local_experts(self) -> int:
        return self.moe.num_experts // self.layout.ep

    def heads(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, head size) on this rank."""
        m, tp = self.job.model, self.layout.tp
        return m.n_heads // tp, m.kv_heads // tp, m.head_size

    @functools.cached_property
    def moe_blocks(self) -> int:
        return sum(self.moe.is_moe_layer(i) for i in range(self.job.model.n_layers))

    @property
    def dense_blocks(self) -> int:
        return self.job.model.n_layers - self.moe_blocks

    @property
    def micro_batches(self) -> int:
        return self.job.train.grad_accum


def make_shapes(job, world_size: int, gpus_per_node: int | None = None, imbalance: float = 1.0,
                device: str = "cuda") -> Shapes:
    """Validate `job` for `world_size` ranks as the trainer would, and describe one rank.

    The planner reads no data and no checkpoint: those sections are checked by the trainer
    at launch, against files that may only exist on the cluster, so they are not read here."""
    if device not in DEVICES:
        raise ConfigError(f"device ({device!r}) must be one of {', '.join(DEVICES)}")
    planned = copy.deepcopy(job)
    # The one data source whose validation reads nothing but a path: "." always exists.
    planned.data = DataConfig(source="tokens", path=".")
    planned.checkpoint = type(job.checkpoint)()
    stage = job.parallel.zero_stage
    layout = planned.validate(world_size)
    per_node = gpus_per_node or world_size
    if per_node < 1:
        raise ConfigError(f"gpus per node ({per_node}) must be >= 1")
    if not imbalance > 0:
        raise ConfigError(f"routing imbalance ({imbalance}) must be > 0: the rows a rank's "
                          "experts receive over the mean (1 = balanced; the busiest rank's is >= 1)")
    precision = precision_of(job.train.precision, stage, device)
    return Shapes(planned, layout, per_node, float(imbalance), device, precision)
