"""What the native MoE layer keeps for backward (after its norm), entry by entry.

Shape letters as in planner/activations.py; N = t x K rows this rank sends, R rows its experts
receive (the busiest rank's), c the compute dtype's bytes. The stages are those of
model/moe/native_backend.py:
  route    TopKRouter: fp32 scores of its input (kept as it is, _LinearInFp32), softmax (or
           sigmoid and its sum), the top-k ids, the renormalisation's operands, the z-loss's
           logits and log-sum-exp, the aux loss's f_e;
  dispatch _ExpandToSortedSlots keeps the inverse sort (N ids); at ep > 1 the regrouping
           _PermuteRows keeps R ids;
  compute  _GroupedSwiGLU keeps x, h1 and h3 (R rows; silu(h1) and h are recomputed);
  combine  at ep > 1 R ids again, then N ids, the N expert outputs (y_TKD) and the N weights.
The all-to-alls keep nothing: their buffers live only while the layer runs (planner/memory.py
counts one layer's in-flight buffers). The eager combine is modelled; train.compile's fused
combine keeps the same bytes (its docstring).
"""

from __future__ import annotations

from planner.saved import Saved, linear_inputs, swiglu
from planner.shapes import FP32, INT64, Shapes


def router(s: Shapes) -> list[Saved]:
    moe, T, E, K = s.moe, s.tokens, s.moe.num_experts, s.moe.top_k
    kept = [Saved("router: input (as the norm left it)", T * s.job.model.dim * s.precision.residual)]
    if moe.score_func == "sigmoid":
        kept += [Saved("router: sigmoid scores", T * E * FP32),
                 Saved("router: score sums (aux-loss probabilities)", T * FP32)]
    else:
        kept.append(Saved("router: softmax probabilities", T * E * FP32))
    kept.append(Saved("router: top-k expert ids", T * K * INT64))
    if moe.renormalizes:
        kept += [Saved("router: top-k scores (renormalised)", T * K * FP32),
                 Saved("router: their sums", T * FP32)]
    return kept + [Saved("router: aux loss f_e", E * FP32),
                   Saved("router: logits (z-loss)", T * E * FP32),
                   Saved("router: log-sum-exp (z-loss)", T * FP32)]


def routed(s: Shapes) -> list[Saved]:
    N, R, c = s.sent_rows, s.recv_rows, s.precision.compute
    D, Fe = s.job.model.dim, s.moe.expert_hidden
    kept = [Saved("dispatch: inverse sort of the N slots", N * INT64)]
    if s.layout.ep > 1:
        kept += [Saved("dispatch: regrouping of the R received rows", R * INT64),
                 Saved("combine: its inverse", R * INT64)]
    return kept + [Saved("experts: x (R received rows)", R * D * c),
                   Saved("experts: group offsets", s.local_experts * 4),
                   Saved("experts: h1 = x w1", R * Fe * c), Saved("experts: h3 = x w3", R * Fe * c),
                   Saved("combine: sort of the N slots", N * INT64),
                   Saved("combine: expert outputs y_TKD (N rows)", N * D * c),
                   # tp's token slice of the weights is a view (rows of a contiguous tensor):
                   # what is kept is the router's whole T x K storage.
                   Saved("combine: weights (fp32, the router's T x K)", s.tokens * s.moe.top_k * FP32)]


def shared_expert(s: Shapes) -> list[Saved]:
    moe = s.moe
    if not moe.shared_expert_hidden:
        return []
    T, D, p = s.tokens, s.job.model.dim, s.precision
    kept = swiglu(s, moe.shared_expert_hidden // s.layout.tp, "shared expert", "router")
    if moe.shared_expert_gate:
        if p.autocast:  # the gate's own bf16 copy of the input, and of its (1, D) weight
            kept += linear_inputs(s, T, D, [D], "shared gate", p.residual)
        kept += [Saved("shared gate: sigmoid", T * p.compute),
                 Saved("shared gate: the shared expert's output", T * D * p.compute)]
    return kept


def moe_layer(s: Shapes) -> list[Saved]:
    return router(s) + routed(s) + shared_expert(s)
