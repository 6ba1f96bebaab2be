"""Memory per rank: the itemised resident bytes, and a modelled peak over one training step.

Resident (exact, held against measurement by the tests): parameters, gradients, optimizer
state and master weights (planner/model_states.py), and the activations one micro-batch keeps
for backward (planner/activations.py).

Peak (a model, held against a GPU's max_memory_allocated by benchmarks/plan_vs_measured.py
and against the CPU profiler's live bytes by benchmarks/plan_peak_cpu.py): the largest of four
moments of a step, each the resident states plus what is alive then (how gradients live at
each stage: planner/grad_life.py):
  forward end  every block's activations, the fp32 logits the loop keeps (out.logits, until
               the next micro-batch's forward returns, so two of them with accumulation),
               the gradients of earlier micro-batches, one MoE layer's all-to-all buffers,
               FSDP2's gathered units;
  backward     walking the blocks from the last: the activations not yet freed plus the
               gradients kept so far, the stage's working buffers, and one block's working
               set (its activations again, for their gradients; a recomputed block's
               activations; the all-to-all buffers);
  reduction    stages 1-2, at the end of backward: DeepSpeed's bucket, its flattened copy and
               the partition's gradients, the activations gone;
  step         the gradients the step reads and the step's own copies (planner/memory.py's
               _step_copy).
Outside the model, stated and added only to decide what fits: an allowance for the CUDA
context, NCCL's buffers, kernels' workspaces and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.activations import Activations, activations
from planner.model_states import ModelStates, busiest
from planner.grad_life import fsdp_local, gradient_life
from planner.params import Param, parameters
from planner.shapes import Shapes
from planner.sharding import deepspeed_groups

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


def memory_plan(s: Shapes) -> MemoryPlan:
    params = parameters(s)
    rank, states = busiest(s, params)
    acts = activations(s)
    m, p = s.job.model, s.precision
    per_block = [acts.moe_block if s.moe.is_moe_layer(i) else acts.dense_block for i in range(m.n_layers)]
    total_acts = sum(per_block) + acts.ends
    a2a = (s.sent_rows + s.recv_rows) * m.dim * p.compute if s.layout.ep > 1 and s.moe_blocks else 0.0
    logits = s.tokens * m.vocab_size * 4
    static = states.params + states.optimizer + states.master
    life = gradient_life(s, params, states)
    accum = s.micro_batches > 1

    fwd = static + total_acts + logits * (2 if accum else 1) + a2a + life.before + life.forward_working
    # Backward starts at the loss: the logits' gradient and log-softmax's, beside the logits.
    grads = life.before + life.kept_head
    bwd = static + total_acts + 3 * logits + grads + life.working
    remaining = total_acts - acts.ends
    for i in reversed(range(m.n_layers)):
        grads += life.kept_per_block[i]
        block = per_block[i] + acts.recompute_transient + (a2a if s.moe.is_moe_layer(i) else 0.0)
        bwd = max(bwd, static + remaining + logits + grads + life.working + block)
        remaining -= per_block[i]
    bwd = max(bwd, static + logits + grads + life.kept_embed + life.working)
    reduce = static + logits + life.reduce_moment
    step_copy = _step_copy(s, params, states)
    step = static + states.grads + logits + step_copy
    phases = {"forward end": fwd, "backward": bwd, "end-of-backward reduction": reduce,
              "optimizer step": step}
    phase = max(phases, key=phases.get)
    transients = life.transients | {"one MoE layer's all-to-all buffers": a2a,
                                    "the loop's fp32 logits": logits,
                                    "the step's own copies": step_copy}
    return MemoryPlan(rank, states, acts, total_acts, a2a, phases[phase], phase, phases, transients)


def _step_copy(s: Shapes, params: list[Param], states: ModelStates) -> float:
    """The step's own copies: stage 0's reduce_gradients flattens the dense (then the expert)
    gradients into one buffer for each all-reduce; DeepSpeed flattens one group's gradient
    partition (and casts it to fp32 in bf16 mode); stage 3 clips in place. Then AdamW: on CUDA
    the fused kernel makes none, on CPU (one tensor at a time) two of its largest tensor."""
    stage, lay = s.job.parallel.zero_stage, s.layout
    largest = max(q.numel for q in params)
    copy = 0.0
    if stage == 0:
        dense = sum(q.numel for q in params if not q.expert) * 4 if lay.dp > 1 else 0
        expert = sum(q.numel for q in params if q.expert) * 4 if lay.edp > 1 else 0
        copy = max(dense, expert)
    elif stage in (1, 2):
        largest = max(g.partition for g in deepspeed_groups(params, lay.dp, lay.edp))
        copy = largest * s.precision.grad + (largest * 4 if s.precision.grad != 4 else 0)
    else:
        largest = max(fsdp_local(q, s) for q in params)
    return copy + (2 * largest * 4 if s.device == "cpu" else 0)
