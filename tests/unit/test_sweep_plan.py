"""The scaling sweep's plan (launcher/sweep.py): batch sizes per mode, expert parallelism per
point, and bad combinations refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.sweep import _key, plan, read_summary
from model.errors import ConfigError

TINY = ["--config", "configs/cpu_tiny.yaml"]


def test_strong_keeps_the_global_batch_and_weak_the_micro_batch():
    points = plan(TINY, ["strong", "weak"], [1, 2, 4], [2], Path("out"))
    strong = [p for p in points if p.mode == "strong"]
    weak = [p for p in points if p.mode == "weak"]
    assert [p.world for p in strong] == [2, 4, 8]
    # cpu_tiny: micro batch 8, so the global batch is 8 x dp 2 at the smallest world
    assert [p.micro_batch_size * p.dp for p in strong] == [16, 16, 16]
    assert [p.micro_batch_size for p in weak] == [8, 8, 8]
    assert [p.ep for p in strong] == [2, 4, 8]  # gcd(dp, 8 experts)
    assert "--parallel.dp=8" in strong[-1].args and "--logging.run_dir=out/strong_4x2" in strong[-1].args
    # the smallest world is the same experiment in both modes: it runs once
    assert _key(strong[0]) == _key(weak[0]) and _key(strong[1]) != _key(weak[1])


def test_the_same_world_on_another_node_layout_is_another_experiment(tmp_path):
    """2 nodes x 2 and 1 node x 4 have one world size and the same arguments, but only one
    crosses nodes; and a finished point is not reused once its config file changed."""
    points = {p.name: p for p in plan(TINY, ["weak"], [1, 2], [2, 4], Path("out"))}
    def without_run_dir(point):
        return [a for a in point.args if not a.startswith("--logging.run_dir=")]

    assert without_run_dir(points["weak_2x2"]) == without_run_dir(points["weak_1x4"])
    assert _key(points["weak_2x2"]) != _key(points["weak_1x4"])
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  dim: 64\n")
    point = plan(["--config", str(config)], ["weak"], [1], [2], Path("out"))[0]
    before = _key(point)
    config.write_text("model:\n  dim: 128\n")
    assert _key(point) != before
    assert _key(point, "slurm") != _key(point, "local")


def test_a_run_stopped_by_a_signal_is_not_a_finished_point(tmp_path):
    """A preempted attempt writes summary.json too, with "stopped": the sweep must neither
    report its figures nor reuse it."""
    assert read_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"steps": 3, "stopped": "SIGUSR1 at step 3"}')
    assert read_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"steps": 6}')
    assert read_summary(tmp_path) == {"steps": 6}


def test_expert_parallelism_can_be_fixed():
    points = plan(TINY, ["weak"], [1, 2], [2], Path("out"), ep="2")
    assert [p.ep for p in points] == [2, 2]


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": [1, 3], "per_node": [2]},
     "strong scaling keeps the global batch at 16 sequences: it must be divisible by dp x "
     "train.grad_accum (6 x 1) at world 6 (3 nodes x 2)"),
    ({"nodes": [0, 2], "per_node": [2]}, "--nodes ([0, 2]) must be one or more integers >= 1"),
    ({"nodes": [1], "per_node": [2], "modes": ["linear"]}, "--mode 'linear' is not one of"),
    ({"nodes": [1, 2], "per_node": [2], "ep": "3"},
     "strong scaling at 1 nodes x 2: parallel.ep (3) must divide parallel.dp (2)"),
    ({"nodes": [1], "per_node": [3], "args": ["--parallel.tp=2"]},
     "world 3 (1 nodes x 3) must be divisible by parallel.tp (2)"),
])
def test_bad_combinations_are_refused_naming_the_values(kwargs, message):
    args = TINY + kwargs.pop("args", [])
    modes = kwargs.pop("modes", ["strong", "weak"])
    with pytest.raises(ConfigError) as info:
        plan(args, modes, kwargs["nodes"], kwargs["per_node"], Path("out"), kwargs.get("ep", "max"))
    assert message in str(info.value)
