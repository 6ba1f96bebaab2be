"""Box arithmetic and the rule of who writes which piece of a checkpoint."""

from __future__ import annotations

import pytest
import torch

from checkpoint.layout import Box, Shard, fill_box
from parallel.topology import Layout, Topology


def test_intersection_and_slices():
    a, b = Box((0, 4), (4, 4)), Box((2, 6), (4, 4))
    common = a.intersect(b)
    assert common == Box((2, 6), (2, 2))
    assert common.slices_within(a) == (slice(2, 4), slice(2, 4))
    assert common.slices_within(b) == (slice(0, 2), slice(0, 2))
    assert a.intersect(Box((4, 0), (2, 2))) is None  # touching edges share nothing


def test_fill_box_assembles_from_tiles_and_refuses_gaps():
    full = torch.arange(6 * 4, dtype=torch.float32).view(6, 4)
    tiles = [(Box((r, 0), (2, 4)), full[r:r + 2]) for r in (0, 2, 4)]  # e.g. ep 3 on dim 0
    target = Box((1, 1), (4, 2))  # straddles three tiles
    assert torch.equal(fill_box(target, tiles, torch.float32), full[1:5, 1:3])
    assert fill_box(target, tiles[:2], torch.float32) is None


@pytest.mark.parametrize("dp, tp, ep", [(4, 1, 2), (2, 2, 2), (4, 2, 4), (8, 1, 1)])
def test_every_piece_has_exactly_one_writer(dp, tp, ep):
    layout = Layout(world_size=dp * tp, dp=dp, ep=ep, tp=tp)
    p = torch.nn.Parameter(torch.zeros(1))
    whole, partition = {}, {}
    for rank in range(layout.world_size):
        topo = Topology(layout, rank, {})
        c = layout.coords(rank)
        for kind, block in (("world", 0), ("dp", c["tp"]), ("edp", c["ep"])):
            shard = Shard("w", p, (1,), Box((0,), (1,)), kind)
            if shard.writes_whole(topo):
                whole.setdefault((kind, block), []).append(rank)
            # Under ZeRO a block is split over its partition group (dp, or edp for experts):
            # one writer per (block, partition index).
            part = c["edp"] if kind == "edp" else c["dp"]
            if shard.writes_partition(topo):
                partition.setdefault((kind, block, part), []).append(rank)
    blocks = [("world", 0)] + [("dp", t) for t in range(tp)] + [("edp", e) for e in range(ep)]
    assert sorted(whole) == sorted(blocks) and all(len(w) == 1 for w in whole.values())
    parts = {"world": dp, "dp": dp, "edp": layout.edp}
    want = [(k, b, i) for k, b in blocks for i in range(parts[k])]
    assert sorted(partition) == sorted(want), sorted(set(partition) ^ set(want))
    assert all(len(w) == 1 for w in partition.values())
