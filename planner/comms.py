"""Every collective one optimizer step runs on a rank: kind, group, bytes per call, calls.

Bytes are this rank's input to the call (parallel/collectives.CollectiveCall's convention): the
tensor all-reduced, its piece of an all-gather, the rows it sends in an all-to-all (its own
included). Counts are per optimizer step, grad_accum micro-batches included. Where the rows an
all-to-all moves depend on routing, `recv_rows` is the busiest rank's (planner/shapes.py).

Who calls what (read in the code; tests/distributed/test_planner.py counts them):
- MoE layer, ep > 1 (model/moe/dispatch.py): per layer and micro-batch a count exchange
  (E int64), the token dispatch (N rows) and the combine (R rows) forward; backward the same
  two exchanges with input and output swapped (their gradients: N and R rows again). A
  recomputed layer (train.recompute) runs its forward collectives again in backward.
- tp > 1 (model/tp.py, parallel/tensor_parallel.py), per block and micro-batch: attention's
  exit (forward all-reduce of wo's output) and enter (backward all-reduce of its input's
  gradient), the same for a dense FFN or a shared expert; an MoE layer's token slice: a
  forward all-gather of the combined rows, backward all-gathers of the slice's input and
  weight gradients; a proj QK-norm's sums of squares (forward and backward, q and k), a head
  QK-norm's gain gradients (backward). Recomputation repeats the forward ones.
- the step: gradient reductions (planner/zero_comms.py), the finite check (3 int64 over the
  world, trainer/divergence.py), the expert-bias load (moe.bias_update_rate: L x E int64 over
  dp). Logging (every logging.log_interval steps) and evaluation are listed apart.
"""

from __future__ import annotations

from planner.collective import Collective
from planner.shapes import FP32, INT64, Shapes
from planner.zero_comms import gradient_collectives

def moe_collectives(s: Shapes) -> list[Collective]:
    lay, moe, c = s.layout, s.moe, s.precision.compute
    if lay.ep == 1 or not s.moe_blocks:
        return []
    calls = s.moe_blocks * s.micro_batches
    again = calls * (s.job.train.recompute != "none")  # the recomputed forward
    D = s.job.model.dim
    N, R = s.sent_rows * D * c, s.recv_rows * D * c
    return [Collective("all_to_all", "ep", moe.num_experts * INT64, calls + again, "MoE count exchange"),
            Collective("all_to_all", "ep", N, 2 * calls + again,
                       "MoE token dispatch (forward) and combine gradient (backward): N rows"),
            Collective("all_to_all", "ep", R, 2 * calls + again,
                       "MoE combine (forward) and dispatch gradient (backward): R rows")]


def tp_collectives(s: Shapes) -> list[Collective]:
    lay, m, moe, p = s.layout, s.job.model, s.moe, s.precision
    if lay.tp == 1:
        return []
    T, D, t, micro = s.tokens, m.dim, s.slice_tokens, s.micro_batches
    mode = s.job.train.recompute
    ffn_again = mode != "none"
    attn_again = mode == "full"
    L, n_moe, n_dense = m.n_layers, s.moe_blocks, s.dense_blocks
    exits = L * (1 + attn_again) + n_dense * (1 + ffn_again)  # attention's and dense FFNs'
    enters = L + n_dense
    if moe.shared_expert_hidden:
        exits += n_moe * (1 + ffn_again)
        enters += n_moe
    out = [Collective("all_reduce", "tp", T * D * p.compute, exits * micro,
                      "tp exit: forward sum of row-parallel outputs"),
           Collective("all_reduce", "tp", T * D * p.residual, enters * micro,
                      "tp enter: backward sum of input gradients")]
    if n_moe:
        out += [Collective("all_gather", "tp", t * D * p.compute, n_moe * (2 + ffn_again) * micro,
                           "MoE token slice: forward gather of outputs, backward of input gradients"),
                Collective("all_gather", "tp", t * moe.top_k * FP32, n_moe * micro,
                           "MoE token slice: backward gather of the weights' gradients")]
    if m.qk_norm == "proj":
        out.append(Collective("all_reduce", "tp", T * FP32, L * 2 * (2 + attn_again) * micro,
                              "proj QK-norm: sums of squares of q and k, forward and backward"))
    elif m.qk_norm == "head":
        out.append(Collective("all_reduce", "tp", m.head_size * p.param, L * 2 * micro,
                              "head QK-norm: the gains' gradients, backward"))
    return out


def step_collectives(s: Shapes) -> list[Collective]:
    out = gradient_collectives(s)
    out.append(Collective("all_reduce", "world", 3 * INT64, 1, "finite check and stop flag"))
    if s.moe.bias_update_rate and s.moe_blocks:
        out.append(Collective("all_reduce", "dp", s.moe_blocks * s.moe.num_experts * INT64, 1,
                              "expert-bias load of the global batch"))
    return out


def per_step(s: Shapes) -> list[Collective]:
    """Every collective of one optimizer step on this rank."""
    return moe_collectives(s) + tp_collectives(s) + step_collectives(s)


def per_log(s: Shapes) -> list[Collective]:
    """trainer/loop.py's _log, every logging.log_interval steps: the window's losses, expert
    counts (and drops), router entropies, summed over dp."""
    out = [Collective("all_reduce", "dp", 3 * FP32, 1, "losses (lm, aux, z)")]
    if s.moe_blocks:
        out += [Collective("all_reduce", "dp", s.moe_blocks * (s.moe.num_experts + 1) * INT64, 1,
                           "expert counts and dropped slots"),
                Collective("all_reduce", "dp", s.moe_blocks * FP32, 1, "router entropy")]
    return out
