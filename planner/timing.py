"""A modelled step time: arithmetic, the optimizer's memory traffic and exposed communication.

A model, not a measurement, with its assumptions stated:
- compute: the busiest rank's FLOPs (its tp share of attention and dense FFNs, the rows its
  experts receive under the stated imbalance, the replicated router and output projection),
  x 3 for forward and backward, plus the forward of whatever train.recompute reruns, at
  hardware.matmul_efficiency of the peak;
- optimizer: AdamW reads parameter, gradient and two moments and writes three of them (28
  bytes per fp32 element of this rank's share) at HBM bandwidth;
- communication: every collective of planner/comms.py with the ring formulas (all-reduce
  2(W-1)/W of the bytes, all-gather (W-1)x, reduce-scatter (W-1)/W, all-to-all: the bytes to
  other ranks, NVLink and the network in parallel) at link_efficiency of the link it crosses
  (the network when the group spans nodes; ranks fill nodes in order), plus a latency per
  step of the ring. None of it overlaps compute: the trainer's all-to-alls and tp collectives
  sit between the kernels that need them and DeepSpeed runs with overlap_comm off; FSDP2's
  gathers and reduce-scatters, which it prefetches, are counted as hidden behind compute.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from model.flops import model_cost
from planner.collective import Collective
from planner.hardware import Hardware
from parallel.topology import Layout
from planner.shapes import Shapes


def spans_nodes(s: Shapes, group: str) -> bool:
    return _spans(s.layout, s.gpus_per_node, group)


@functools.cache
def _spans(layout: Layout, per_node: int, group: str) -> bool:
    if group == "world":
        return layout.world_size > per_node
    return any(len({r // per_node for r in ranks}) > 1 for ranks in layout.group_ranks(group))


def a2a_shares(s: Shapes) -> tuple[float, float, float]:
    """Shares of an expert-parallel all-to-all's bytes to itself, its node, other nodes, for
    the rank with the most off-node peers, under routing that is uniform over the experts."""
    return _a2a_shares(s.layout, s.gpus_per_node)


@functools.cache
def _a2a_shares(layout: Layout, per_node: int) -> tuple[float, float, float]:
    shares = []
    for ranks in layout.group_ranks("ep"):
        for r in ranks:
            same = sum(q // per_node == r // per_node for q in ranks) - 1
            other = len(ranks) - 1 - same
            shares.append((1 / len(ranks), same / len(ranks), other / len(ranks)))
    return max(shares, key=lambda x: x[2])


def collective_seconds(c: Collective, s: Shapes, hw: Hardware) -> float:
    W = {"dp": s.layout.dp, "tp": s.layout.tp, "ep": s.layout.ep, "edp": s.layout.edp,
         "world": s.layout.world_size}[c.group]
    if W == 1:
        return 0.0
    inter = spans_nodes(s, c.group)
    bw = (hw.inter_gbps if inter else hw.intra_gbps) * 1e9 * hw.link_efficiency
    alpha = (hw.inter_latency_us if inter else hw.intra_latency_us) * 1e-6
    if c.op == "all_to_all":
        _, near, far = a2a_shares(s)
        wire = max(c.nbytes * near / (hw.intra_gbps * 1e9 * hw.link_efficiency),
                   c.nbytes * far / (hw.inter_gbps * 1e9 * hw.link_efficiency))
        return c.count * (wire + (W - 1) * alpha)
    factor, steps = {"all_reduce": (2 * (W - 1) / W, 2 * (W - 1)), "all_gather": (W - 1, W - 1),
                     "reduce_scatter": ((W - 1) / W, W - 1)}[c.op]
    return c.count * (factor * c.nbytes / bw + steps * alpha)


def rank_flops(s: Shapes) -> float:
    """Training FLOPs of one optimizer step on the busiest rank."""
    m, moe = s.job.model, s.moe
    T, D, (Hl, Gl, Dh) = s.tokens, m.dim, s.heads()
    q, kv, S = Hl * Dh, Gl * Dh, s.job.train.seq_len
    attention = T * 2 * (2 * D * q + 2 * D * kv) + T * 4 * q * (S + 1) / 2
    dense = T * 2 * 3 * D * (m.ffn_hidden // s.layout.tp)
    shared = T * 2 * (3 * D * moe.shared_expert_hidden // s.layout.tp + D * moe.shared_expert_gate)
    moe_ffn = T * 2 * D * moe.num_experts + s.recv_rows * 2 * 3 * D * moe.expert_hidden + shared
    ffn = s.dense_blocks * dense + s.moe_blocks * moe_ffn
    forward = m.n_layers * attention + ffn + T * 2 * D * m.vocab_size
    again = {"none": 0.0, "ffn": ffn, "full": ffn + m.n_layers * attention}[s.job.train.recompute]
    return s.micro_batches * (3 * forward + again)


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    optimizer_s: float
    comm_s: float
    """Exposed communication."""
    hidden_comm_s: float
    """FSDP2's, counted as overlapped with compute."""
    per_collective_s: list[float]
    tokens_per_s: float
    mfu: float

    @property
    def total_s(self) -> float:
        return max(self.compute_s, self.hidden_comm_s) + self.optimizer_s + self.comm_s


def step_time(s: Shapes, collectives: list[Collective], optimizer_elements: float, hw: Hardware) -> StepTime:
    compute = rank_flops(s) / (hw.peak_tflops * 1e12 * hw.matmul_efficiency)
    optimizer = optimizer_elements * 28 / (hw.hbm_tbps * 1e12)
    seconds = [collective_seconds(c, s, hw) for c in collectives]
    hidden = sum(t for c, t in zip(collectives, seconds) if c.via == "FSDP2" and c.op != "all_reduce")
    exposed = sum(seconds) - hidden
    total = max(compute, hidden) + optimizer + exposed
    tokens = s.layout.dp * s.micro_batches * s.tokens
    flops = model_cost(s.job.model, s.moe, s.job.train.seq_len).flops_per_token * tokens
    mfu = flops / (total * s.layout.world_size * hw.peak_tflops * 1e12) if total > 0 else 0.0
    return StepTime(compute, optimizer, exposed, hidden, seconds, tokens / total if total else 0.0, mfu)
