"""The gradient reductions and parameter gathers of one optimizer step, by ZeRO stage.

  0  ours (parallel/data_parallel.py): one all-reduce of every dense gradient (fp32, flat) over
     dp when dp > 1, one of every expert gradient over edp when edp > 1; the norm's squared
     sums: tp-split dense parameters over tp, experts over ep (when those exceed 1).
  1-2  DeepSpeed 0.19.8 (runtime/zero/stage_1_and_2.py) with parallel/zero.py's settings:
     gradients are copied into a reduce bucket (5e8 elements, or the rank's parameters if
     fewer: parallel/zero.py); each time it would overflow,
     and once at the end of backward, the bucket is all-reduced, one call per process group
     it holds (dp for dense, edp for experts: use_multi_rank_bucket_allreduce), in the
     parameters' dtype; stage 2 does this in every micro-batch's backward, stage 1 once at
     the accumulation boundary. A gradient larger than the bucket is reduced on its own. The
     order is backward's (stage 2, modelled as the parameters' reverse order) or the groups'
     (stage 1). The norm: per group one 4-byte all-reduce over dp and, with tp, one over tp;
     per expert group one over edp. After the step, each group of more than one rank
     all-gathers its partitions (all_gather_into_tensor).
  3  FSDP2 (parallel/fsdp.py): per unit (a block's dense parameters on dp, its experts on
     edp, the embedding, the output end; with tied embeddings the root holds the embedding
     and the final norm) an all-gather of the shards before forward and again before
     backward (the output end and the root stay gathered), in the compute dtype, and a
     reduce-scatter of the fp32 gradients at the last micro-batch (every micro-batch with
     parallel.fsdp_reduce_every_micro_batch); units of one rank run none; the norm: one
     all-reduce over the world.
"""

from __future__ import annotations

from planner.collective import Collective
from planner.params import Param, parameters
from planner.shapes import FP32, Shapes
from planner.sharding import deepspeed_groups, reduce_bucket



def gradient_collectives(s: Shapes) -> list[Collective]:
    params = parameters(s)
    stage = s.job.parallel.zero_stage
    if stage == 0:
        return _ours(s, params)
    if stage == 3:
        return _fsdp(s, params)
    return _deepspeed(s, params)


def _ours(s: Shapes, params: list[Param]) -> list[Collective]:
    lay, out = s.layout, []
    dense = sum(p.numel for p in params if not p.expert) * FP32
    expert = sum(p.numel for p in params if p.expert) * FP32
    if lay.dp > 1:
        out.append(Collective("all_reduce", "dp", dense, 1, "dense gradients (mean over dp)"))
    if lay.edp > 1 and expert:
        out.append(Collective("all_reduce", "edp", expert, 1, "expert gradients (sum over edp / dp)"))
    if lay.tp > 1:
        out.append(Collective("all_reduce", "tp", FP32, 1, "gradient norm: tp-split parameters"))
    if lay.ep > 1:
        out.append(Collective("all_reduce", "ep", FP32, 1, "gradient norm: experts"))
    return out


def _flushes(order: list[Param], limit: int) -> list[dict[bool, int]]:
    """Elements per flush of DeepSpeed's reduce bucket of `limit` elements, dense/expert."""
    flushes, bucket, size = [], {False: 0, True: 0}, 0
    for p in order:
        if size + p.numel > limit and size:
            flushes.append(bucket)
            bucket, size = {False: 0, True: 0}, 0
        bucket[p.expert] += p.numel
        size += p.numel
        if p.numel > limit:  # reduced on its own, straight away
            flushes.append(bucket)
            bucket, size = {False: 0, True: 0}, 0
    if size:
        flushes.append(bucket)
    return flushes


def _deepspeed(s: Shapes, params: list[Param]) -> list[Collective]:
    lay, p, stage = s.layout, s.precision, s.job.parallel.zero_stage
    groups = deepspeed_groups(params, lay.dp, lay.edp)
    if stage == 2:
        order, times = list(reversed(params)), s.micro_batches
    else:  # stage 1 walks its groups' parameters in order at the boundary
        times = 1
        order = ([q for q in params if not q.expert and q.decays]
                 + [q for q in params if not q.expert and not q.decays] + [q for q in params if q.expert])
    calls: dict[tuple[str, float], int] = {}
    for flush in _flushes(order, reduce_bucket(params)):
        for expert, n in flush.items():
            if n:
                key = ("edp" if expert else "dp", n * p.grad)
                calls[key] = calls.get(key, 0) + times
    out = [Collective("all_reduce", g, nbytes, k, "gradient bucket", "DeepSpeed")
           for (g, nbytes), k in calls.items()]
    n_groups = len(groups)
    out.append(Collective("all_reduce", "dp", FP32, n_groups, "gradient norm, per group", "DeepSpeed"))
    if lay.tp > 1:
        out.append(Collective("all_reduce", "tp", FP32, n_groups, "gradient norm, per group", "DeepSpeed"))
    n_expert = sum(g.expert for g in groups)
    if n_expert:
        out.append(Collective("all_reduce", "edp", FP32, n_expert, "expert gradient norms", "DeepSpeed"))
    for g in groups:
        if g.world > 1:
            out.append(Collective("all_gather", "edp" if g.expert else "dp", g.partition * p.param, 1,
                                  f"updated parameters ({g.name})", "DeepSpeed"))
    return out


def _fsdp(s: Shapes, params: list[Param]) -> list[Collective]:
    from planner.sharding import expert_shard_dim, fsdp_shard, fsdp_unit

    lay, c = s.layout, s.precision.compute
    units: dict[tuple[str, bool], int] = {}  # (unit, expert) -> padded shard elements
    for q in params:
        unit = fsdp_unit(q.name, s.job.model.tie_embeddings)
        world = lay.edp if q.expert else lay.dp
        dim = expert_shard_dim(q.shape, world) if q.expert else 0
        units[(unit, q.expert)] = units.get((unit, q.expert), 0) + fsdp_shard(q, world, 0, dim)[1]
    scatters = s.micro_batches if s.job.parallel.fsdp_reduce_every_micro_batch else 1
    out = []
    for (unit, expert), shard in units.items():
        group = "edp" if expert else "dp"
        world = lay.edp if expert else lay.dp
        if world == 1:  # FSDP2 runs no collective on a mesh of one
            continue
        gathers = 1 if unit in ("output end", "root") else 2  # kept gathered to backward
        out += [Collective("all_gather", group, shard * c, gathers * s.micro_batches,
                           f"FSDP unit {unit}{' experts' if expert else ''}: parameters", "FSDP2"),
                Collective("reduce_scatter", group, shard * world * FP32, scatters,
                           f"FSDP unit {unit}{' experts' if expert else ''}: gradients", "FSDP2")]
    out.append(Collective("all_reduce", "world", FP32, 1, "gradient norm"))
    return out
