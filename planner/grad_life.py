"""How gradients live through one backward, stage by stage: what stays after each block's
backward, what is there before it starts, and what each stage's machinery adds.

  0  autograd's gradients, whole, as each block's backward makes them (fp32);
  1  the same in the parameters' dtype; DeepSpeed's reduce bucket is allocated at the first
     gradient of each backward; at the accumulation boundary, after backward, the gradients
     are copied into it, it is flattened once more for the all-reduce, and the gradients of
     this rank's partition are copied out (planner/model_states.py's "held");
  2  each gradient goes into the bucket as it is made (the bucket, not the gradients, is
     what stays); the flush at the end of backward flattens it and copies out the held part;
  3  FSDP2: each unit's gradient is reduce-scattered after its backward (an fp32 copy of the
     unit's unsharded gradient is the input) and its shard kept; a block's units (its dense
     parameters, its experts) are gathered for its forward and again for its backward, one
     block at a time (measured: benchmarks/plan_peak_cpu.py). With accumulation
     and no reduce-scatter per micro-batch, the unsharded gradients stay, as at stage 0.
With accumulation, the earlier micro-batches' gradients are there before backward starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.model_states import ModelStates
from planner.params import Param
from planner.shapes import FP32, Shapes
from planner.sharding import expert_shard_dim, fsdp_shard, fsdp_unit, reduce_bucket

@dataclass(frozen=True)
class GradientLife:
    kept_per_block: list[float]
    kept_head: float
    kept_embed: float
    before: float
    """Gradient bytes there before this backward (earlier micro-batches)."""
    working: float
    """Alive during every block's backward (DeepSpeed's bucket; FSDP2's unit buffers)."""
    forward_working: float
    """Alive during forward (FSDP2's gathered units)."""
    reduce_moment: float
    """Gradient bytes at the end-of-backward reduction, activations gone (stages 1-2)."""
    transients: dict[str, float] = field(default_factory=dict)


def fsdp_local(q: Param, s: Shapes, padded: bool = False) -> int:
    """Elements of `q`'s FSDP2 shard on rank 0 (the busiest: it holds a full chunk of all)."""
    world = s.layout.edp if q.expert else s.layout.dp
    dim = expert_shard_dim(q.shape, world) if q.expert else 0
    mine, stored = fsdp_shard(q, world, 0, dim)
    return stored if padded else mine


def _per_block(params: list[Param], size, n_layers: int) -> tuple[list[float], float, float]:
    blocks, head, embed = [0.0] * n_layers, 0.0, 0.0
    for q in params:
        if q.name.startswith("layers."):
            blocks[int(q.name.split(".")[1])] += size(q)
        elif q.name == "tok_embeddings.weight":
            embed += size(q)
        else:
            head += size(q)
    return blocks, head, embed


def _largest_unit(params: list[Param], tied: bool) -> int:
    """Elements of the largest FSDP unit gathered at once: a block (its dense parameters and
    its experts, this rank's tp and ep slices), the embedding, the output end, the root."""
    units: dict[str, int] = {}
    for q in params:
        key = fsdp_unit(q.name, tied)
        units[key] = units.get(key, 0) + q.numel
    return max(units.values())


def gradient_life(s: Shapes, params: list[Param], states: ModelStates) -> GradientLife:
    stage, p, L = s.job.parallel.zero_stage, s.precision, s.job.model.n_layers
    accum = s.micro_batches > 1
    whole = sum(q.numel for q in params) * p.grad
    if stage in (0, 1):
        blocks, head, embed = _per_block(params, lambda q: q.numel * p.grad, L)
        if accum:  # every gradient exists already: backward adds in place
            blocks, head, embed = [0.0] * L, 0.0, 0.0
        if stage == 0:
            return GradientLife(blocks, head, embed, whole if accum else 0.0, 0.0, 0.0, 0.0)
        bucket = reduce_bucket(params) * p.grad
        reduce = max(whole + bucket, bucket + min(whole, bucket) + states.grads)
        return GradientLife(blocks, head, embed, whole if accum else 0.0, bucket, 0.0, reduce,
                            {"DeepSpeed reduce bucket (reduce_bucket_size elements)": bucket,
                             "its flattened copy for the all-reduce": min(whole, bucket)})
    if stage == 2:
        bucket = reduce_bucket(params) * p.grad
        before = states.grads if accum else 0.0
        return GradientLife([0.0] * L, 0.0, 0.0, before, bucket, 0.0,
                            bucket + min(whole, bucket) + states.grads + before,
                            {"DeepSpeed reduce bucket (reduce_bucket_size elements)": bucket,
                             "its flattened copy for the all-reduce": min(whole, bucket)})
    unit = _largest_unit(params, s.job.model.tie_embeddings)
    gathered = unit * p.compute  # a block's dense unit and its experts' unit, gathered together
    if accum and not s.job.parallel.fsdp_reduce_every_micro_batch:
        blocks, head, embed = _per_block(params, lambda q: q.numel * FP32, L)
        return GradientLife([0.0] * L, 0.0, 0.0, whole, gathered, gathered, 0.0,
                            {"one block's gathered parameters (FSDP2)": gathered})
    blocks, head, embed = _per_block(params, lambda q: fsdp_local(q, s, padded=True) * FP32, L)
    working = gathered + 2 * unit * FP32  # the unit's unsharded gradient and its fp32 copy
    before = states.grads if accum else 0.0
    return GradientLife(blocks, head, embed, before, working, gathered, 0.0,
                        {"one block's gathered parameters (FSDP2)": gathered,
                         "one unit's unsharded gradient and reduce-scatter input": 2 * unit * FP32})
