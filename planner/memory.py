"""Memory per rank: the itemised resident bytes, and a modelled peak over one training step.

Resident (exact, held against measurement by the tests): parameters, gradients, optimizer
state and master weights (planner/model_states.py), and the activations one micro-batch keeps
for backward (planner/activations.py).

Peak (a model, held against a GPU's max_memory_allocated by benchmarks/plan_vs_measured.py):
the largest of three moments of a step, each the resident states plus what is alive then:
  forward end  every block's activations, the fp32 logits the loop keeps (out.logits, until
               the next micro-batch's forward returns, so two of them with accumulation),
               gradients already accumulated (micro-batches after the first: whole at stages
               0-1 and at 3 without parallel.fsdp_reduce_every_micro_batch),
               one MoE layer's all-to-all buffers;
  backward     walking the blocks from the last: the activations not yet freed plus the
               gradients made so far, plus one block's working set (its activations again,
               for their gradients; a recomputed block's activations; the all-to-all buffers;
               at stages 1-2 DeepSpeed's reduce bucket, allocated whole for each backward, and
               its flattened copy; at stage 3 two units' gathered parameters);
  step         the gradients the step reads and the step's own copies (stage 0: one flat copy
               of the dense or expert gradients for their all-reduce; 1-2: one group's flat
               gradient partition, and its fp32 cast in bf16 mode).
Outside the model, stated and added only to decide what fits: an allowance for the CUDA
context, NCCL's buffers, kernels' workspaces and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.activations import Activations, activations
from planner.model_states import ModelStates, busiest
from planner.params import Param, parameters
from planner.shapes import Shapes
from planner.sharding import reduce_bucket

ALLOWANCE_FIXED = 1 << 30  # CUDA context, NCCL buffers
ALLOWANCE_FRACTION = 0.05  # workspaces, fragmentation


@dataclass(frozen=True)
class MemoryPlan:
    rank: int
    """The rank described: the one with the most resident bytes."""
    states: ModelStates
    acts: Activations
    activations: float
    """All blocks' kept activations for one micro-batch."""
    a2a_buffers: float
    """One MoE layer's all-to-all send and receive rows (0 at ep 1)."""
    peak: float
    peak_phase: str
    phases: dict[str, float] = field(default_factory=dict)
    transients: dict[str, float] = field(default_factory=dict)

    @property
    def allowance(self) -> float:
        return ALLOWANCE_FIXED + ALLOWANCE_FRACTION * self.peak

    @property
    def needed(self) -> float:
        return self.peak + self.allowance


def _block_params(params: list[Param], nbytes: int, n_layers: int) -> tuple[list[float], float, float]:
    """(gradient bytes per block, of the output end (final norm, output), of the embedding)."""
    per_block = [0.0] * n_layers
    head = embed = 0.0
    for p in params:
        if p.name.startswith("layers."):
            per_block[int(p.name.split(".")[1])] += p.numel * nbytes
        elif p.name == "tok_embeddings.weight":
            embed += p.numel * nbytes
        else:
            head += p.numel * nbytes
    return per_block, head, embed


def memory_plan(s: Shapes) -> MemoryPlan:
    params = parameters(s)
    rank, states = busiest(s, params)
    acts = activations(s)
    m, p, stage = s.job.model, s.precision, s.job.parallel.zero_stage
    T, D = s.tokens, m.dim
    per_block = [acts.moe_block if s.moe.is_moe_layer(i) else acts.dense_block for i in range(m.n_layers)]
    total_acts = sum(per_block) + acts.ends
    a2a = (s.sent_rows + s.recv_rows) * D * p.compute if s.layout.ep > 1 and s.moe_blocks else 0.0
    logits = T * m.vocab_size * 4
    static = states.params + states.optimizer + states.master
    accum = s.micro_batches > 1

    # Gradients as backward makes them: whole ones at stages 0-1 (stage 1 reduces at the end),
    # and at stage 3 in the micro-batches that do not reduce-scatter (parallel/fsdp.py).
    scatter_each = s.job.parallel.fsdp_reduce_every_micro_batch
    whole = stage < 2 or (stage == 3 and accum and not scatter_each)
    full_grad = sum(q.numel for q in params) * p.grad
    grad_blocks, grad_head, grad_embed = _block_params(params, p.grad if whole else 0, m.n_layers)
    transients = {}
    if stage in (1, 2):
        bucket_bytes = reduce_bucket(params) * p.grad
        transients["DeepSpeed reduce bucket (reduce_bucket_size elements)"] = bucket_bytes
        transients["its flattened copy for the all-reduce"] = min(full_grad, bucket_bytes)
    if stage == 3:
        transients["two FSDP units' gathered parameters"] = 2 * _largest_unit(params, s) * p.compute
    bucket = sum(transients.values())
    # Stages 2-3 keep only this rank's part, made as backward goes (planner/model_states.py).
    held_in_backward = states.grads if stage >= 2 else 0.0

    # With accumulation, the gradients of earlier micro-batches are there already (stages 0-1:
    # whole; stage 2: this rank's part) and backward adds into them in place.
    earlier = full_grad if accum and whole else 0.0
    fwd = (static + total_acts + logits * (2 if accum else 1) + a2a + earlier
           + (held_in_backward if accum else 0.0))
    grows = not (accum and whole)
    grads = earlier + (grad_head if grows else 0.0)
    # Backward starts at the loss: the logits' gradient and log-softmax's, beside the logits.
    bwd = static + total_acts + 3 * logits + grads + held_in_backward + bucket
    remaining = total_acts - acts.ends
    for i in reversed(range(m.n_layers)):
        grads += grad_blocks[i] if grows else 0.0
        working = per_block[i] + acts.recompute_transient + (a2a if s.moe.is_moe_layer(i) else 0.0)
        bwd = max(bwd, static + remaining + logits + grads + held_in_backward + bucket + working)
        remaining -= per_block[i]
    grads += grad_embed if grows else 0.0
    bwd = max(bwd, static + logits + grads + held_in_backward + bucket)
    step_copy = _step_copy(s, params, states)
    step = static + states.grads + logits + step_copy
    phases = {"forward end": fwd, "backward": bwd, "optimizer step": step}
    phase = max(phases, key=phases.get)
    transients |= {"one MoE layer's all-to-all buffers": a2a, "the loop's fp32 logits": logits,
                   "the step's gradient copy": step_copy}
    return MemoryPlan(rank, states, acts, total_acts, a2a, phases[phase], phase, phases, transients)


def _step_copy(s: Shapes, params: list[Param], states: ModelStates) -> float:
    """Stage 0: reduce_gradients flattens the dense (then the expert) gradients into one buffer
    for each all-reduce; stages 1-2: DeepSpeed flattens one group's partition, and casts it to
    fp32 in bf16 mode; stage 3 clips in place."""
    stage, lay = s.job.parallel.zero_stage, s.layout
    if stage == 0:
        dense = sum(q.numel for q in params if not q.expert) * 4 if lay.dp > 1 else 0
        expert = sum(q.numel for q in params if q.expert) * 4 if lay.edp > 1 else 0
        return max(dense, expert)
    if stage == 3:
        return 0.0
    from planner.sharding import deepspeed_groups

    largest = max(g.partition for g in deepspeed_groups(params, lay.dp, lay.edp))
    return largest * s.precision.grad + (largest * 4 if s.precision.grad != 4 else 0)


def _largest_unit(params: list[Param], s: Shapes) -> int:
    """Elements of the largest FSDP unit gathered at once: a block's dense parameters plus
    its experts' (this rank's tp and ep slices), or the embedding, or the output end."""
    units: dict[str, int] = {}
    for q in params:
        key = ".".join(q.name.split(".")[:2]) if q.name.startswith("layers.") else q.name
        units[key] = units.get(key, 0) + q.numel
    return max(units.values())
