"""The planner's arithmetic on hand-worked cases: ZeRO layouts, node placement, the ring
formulas, hardware figures. (Against the trainer: tests/distributed/test_planner.py.)"""

from __future__ import annotations

import pytest

from launcher.config import load_config
from model.errors import ConfigError
from planner.collective import Collective
from planner.hardware import hardware, parse_bytes
from planner.model_states import model_states
from planner.params import Param
from planner.shapes import make_shapes
from planner.sharding import MAX_EXPERT_GROUP, FlatGroup, deepspeed_groups, fsdp_shard
from planner.timing import a2a_shares, collective_seconds


def test_a_partition_holds_every_gradient_it_overlaps_whole():
    # 18 elements padded to 20 over 2 ranks: partition 0 is [0, 10), 1 is [10, 20).
    split = FlatGroup("g", False, (12, 6), 2)
    assert (split.padded, split.partition) == (20, 10)
    assert split.grads_held(0) == 12  # the first tensor, whole, though only 10 are its
    assert split.grads_held(1) == 12 + 6 + 2  # the same tensor again, the second, 2 of padding
    aligned = FlatGroup("g", False, (10, 3, 5), 2)
    assert [aligned.grads_held(p) for p in (0, 1)] == [10, 3 + 5 + 2]
    beyond = FlatGroup("g", False, (3,), 4)  # 3 elements, 8 after padding, 2 per rank
    assert [beyond.grads_held(p) for p in range(4)] == [3, 3 + 1, 2, 2]


def test_deepspeed_groups_cut_the_experts_as_deepspeed_does():
    big = MAX_EXPERT_GROUP // 2 + 1
    params = [Param("norm", (8,), False), Param("w", (4, 4), False), Param("e0", (big,), True),
              Param("e1", (big, 1), True), Param("e2", (5, 1), True)]
    groups = deepspeed_groups(params, dp=4, edp=2)
    assert [(g.name, g.numels, g.world) for g in groups] == [
        ("dense decay", (16,), 4), ("dense no_decay", (8,), 4),
        ("experts decay 0", (big, 5), 2), ("experts no_decay 0", (big,), 2)]
    huge = [Param("e", (MAX_EXPERT_GROUP + 1, 1), True)]
    assert [g.numels for g in deepspeed_groups(huge, 1, 1) if g.expert] == [(), (MAX_EXPERT_GROUP + 1,)]


def test_fsdp_chunks_are_equal_but_the_last():
    p = Param("w", (10, 3), False)
    assert [fsdp_shard(p, 4, r) for r in range(4)] == [(9, 9), (9, 9), (9, 9), (3, 9)]
    assert fsdp_shard(Param("e", (2, 8, 6), True), 4, 1, dim=1) == (2 * 2 * 6, 2 * 2 * 6)


def test_stage3_shards_dense_over_dp_and_experts_over_edp():
    job = load_config(["--config", "configs/cpu_tiny.yaml", "--parallel.dp=4", "--parallel.ep=2",
                       "--parallel.zero_stage=3"])
    s = make_shapes(job, 4, device="cpu")
    every = model_states(make_shapes(load_config(["--config", "configs/cpu_tiny.yaml",
                                                  "--parallel.dp=1", "--parallel.ep=1"]), 1, device="cpu"))
    mine = model_states(s, 0)
    # cpu_tiny: 1.9 M parameters, experts 1.57 M of them; edp = 2 ranks hold each of ep's halves.
    experts = 4 * 3 * 8 * 128 * 128
    assert mine.optimizer == 8 * ((every.params // 4 - experts) // 4 + experts // 2 // 2)
    assert mine.master == 0


def test_all_to_all_shares_follow_the_nodes():
    job = load_config(["--config", "configs/cpu_tiny.yaml"])  # dp 4, ep 4
    assert a2a_shares(make_shapes(job, 4, gpus_per_node=4)) == (0.25, 0.75, 0.0)
    assert a2a_shares(make_shapes(job, 4, gpus_per_node=2)) == (0.25, 0.25, 0.5)


def test_ring_formulas_and_links():
    job = load_config(["--config", "configs/cpu_tiny.yaml"])
    hw = hardware("h100", link_efficiency=1.0, intra_latency_us=1.0, inter_latency_us=2.0)
    node, split = make_shapes(job, 4, gpus_per_node=4), make_shapes(job, 4, gpus_per_node=2)
    reduce = Collective("all_reduce", "dp", 450e9, 2, "x")
    assert collective_seconds(reduce, node, hw) == pytest.approx(2 * (2 * 3 / 4 + 6e-6))
    assert collective_seconds(reduce, split, hw) == pytest.approx(2 * (2 * 3 / 4 * 9 + 6 * 2e-6))
    a2a = Collective("all_to_all", "ep", 100e9, 1, "x")
    assert collective_seconds(a2a, split, hw) == pytest.approx(max(25 / 450, 50 / 50) + 3 * 2e-6)
    assert collective_seconds(Collective("all_reduce", "edp", 1e9, 1, "x"), node, hw) == 0.0  # edp 1


def test_hardware_figures_and_overrides():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("80 GB") == 80e9 and parse_bytes("1e3") == 1000
    h200 = hardware("h200", peak_tflops=900.0)
    assert (h200.memory_gib, h200.peak_tflops, h200.hbm_tbps) == (140.4, 900.0, 4.8)
    with pytest.raises(ConfigError, match=r"matmul_efficiency \(1.5\) must be at most 1"):
        hardware("h100", matmul_efficiency=1.5)
    with pytest.raises(ConfigError, match=r"inter_gbps \(0.0\) must be > 0"):
        hardware("h100", inter_gbps=0.0)
