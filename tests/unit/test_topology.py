"""Layout arithmetic: rank order and group membership, before any process group exists."""

import pytest

from model.errors import ConfigError
from parallel.topology import Layout


def test_world8_ep4_rank_order():
    lay = Layout(world_size=8, dp=8, ep=4)
    assert lay.edp == 2
    assert lay.group_ranks("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.group_ranks("edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.group_ranks("dp") == [list(range(8))]
    assert lay.group_ranks("tp") == [[r] for r in range(8)]
    assert lay.coords(6) == {"dp": 6, "tp": 0, "ep": 2, "ep_group": 1, "edp": 1}


def test_tp_ranks_are_adjacent_and_experts_span_dp():
    lay = Layout(world_size=8, dp=4, ep=2, tp=2)
    assert lay.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.group_ranks("dp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lay.group_ranks("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # tp partners hold the same experts (experts are not split by tp): edp = world / ep
    assert lay.edp == 4 and lay.group_ranks("edp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    for rank in range(8):  # the coordinate is the rank's position inside each group
        c = lay.coords(rank)
        for kind in ("dp", "tp", "ep", "edp"):
            group = next(g for g in lay.group_ranks(kind) if rank in g)
            assert group.index(rank) == c[kind], (rank, kind)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=4, dp=2, ep=1), r"WORLD_SIZE \(4\) must equal parallel.dp \(2\) x tp \(1\)"),
    (dict(world_size=6, dp=6, ep=4), r"parallel.ep \(4\) must divide parallel.dp \(6\)"),
    (dict(world_size=4, dp=4, ep=0), r"ep \(0\) must be >= 1"),
])
def test_bad_layouts(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Layout(**kwargs)


def test_every_rank_is_in_exactly_one_group_of_each_kind():
    lay = Layout(world_size=12, dp=6, ep=3, tp=2)
    for kind in ("dp", "tp", "ep", "edp"):
        members = sorted(r for g in lay.group_ranks(kind) for r in g)
        assert members == list(range(12)), kind
