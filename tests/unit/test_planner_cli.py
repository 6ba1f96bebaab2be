"""moe-plan as a user runs it (launcher/plan.py): the report, JSON, --search, bad input."""

from __future__ import annotations

import json

import pytest

from launcher import exit_codes
from launcher.config import load_config
from launcher.plan import main
from planner.search import global_batch, with_candidate

TINY = ["--config", "configs/cpu_tiny.yaml"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([*TINY, *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_itemises_memory_collectives_and_time(capsys):
    code, out, _ = _run(capsys, "--gpus", "4", "--device", "cpu")
    assert code == exit_codes.OK
    for line in ("parameters (32-bit)", "gradients", "optimizer state", "activations kept for backward",
                 "4 MoE blocks x", "all-to-all buffers", "modelled peak", "allowance", "fits in",
                 "MoE count exchange", "finite check", "compute", "communication", "MFU"):
        assert line in out, line
    assert "master weights" not in out  # stage 0 keeps none


def test_json_holds_the_same_plan_as_the_text(capsys):
    code, out, _ = _run(capsys, "--gpus", "4", "--device", "cpu", "--json", "--parallel.zero_stage=1")
    assert code == exit_codes.OK
    plan = json.loads(out)
    mem = plan["memory"]
    assert plan["layout"] == {"dp": 4, "tp": 1, "ep": 4, "edp": 1, "zero_stage": 1, "recompute": "none",
                              "micro_batch_size": 8, "grad_accum": 1, "seq_len": 128, "precision": "fp32"}
    assert mem["master"] > 0 and mem["needed"] > mem["peak"] >= mem["params"] + mem["optimizer"]
    ops = {(c["op"], c["group"], c["via"]) for c in plan["collectives"]}
    assert ("all_gather", "dp", "DeepSpeed") in ops and ("all_to_all", "ep", "ours") in ops
    assert plan["step_time"]["modelled"] is True


def test_a_memory_too_small_does_not_fit(capsys):
    code, out, _ = _run(capsys, "--gpus", "4", "--device", "cpu", "--gpu-memory", "100MiB")
    assert code == exit_codes.OK and "fits in 0.0976562 GiB: NO" in out


@pytest.mark.parametrize("argv, says", [
    (["--gpus", "6"], "parallel.ep (4) must divide parallel.dp (6)"),
    (["--gpus", "4", "--imbalance", "0"], "routing imbalance (0.0) must be > 0"),
    (["--gpus", "4", "--gpu-memory", "lots"], "--gpu-memory ('lots')"),
    (["--gpus", "4", "--hardware", "a100"], "--hardware ('a100') must be one of h100, h200"),
    (["--gpus", "4", "--moe.top_k=9"], "moe.top_k (9) must be between 1 and moe.num_experts (8)"),
    (["--gpus", "0"], "--gpus (0) must be >= 1"),
    (["--gpus", "4", "--gpus-per-node", "0"], "--gpus-per-node (0) must be >= 1"),
])
def test_bad_input_is_a_config_error_naming_the_values(capsys, argv, says):
    code, out, err = _run(capsys, "--parallel.dp=null", *argv)
    assert code == exit_codes.CONFIG and says in err and not out


def test_search_keeps_the_global_batch_and_ranks_by_fit_then_time(capsys):
    code, out, _ = _run(capsys, "--gpus", "8", "--gpus-per-node", "4", "--parallel.dp=null",
                        "--search", "--json", "--gpu-memory", "1.02GiB")
    assert code == exit_codes.OK
    plans = json.loads(out)["plans"]
    job = load_config(TINY + ["--parallel.dp=null"])
    batch = global_batch(job, 8)
    layouts = [p["layout"] for p in plans]
    assert all(lay["dp"] * lay["micro_batch_size"] * lay["grad_accum"] == batch for lay in layouts)
    assert {lay["tp"] for lay in layouts} == {1, 2, 4}  # n_heads 4, at most 4 per node
    assert {lay["zero_stage"] for lay in layouts} == {0, 1, 2, 3}
    assert all(job.moe.num_experts % lay["ep"] == 0 and lay["dp"] % lay["ep"] == 0 for lay in layouts)
    keys = [(not p["memory"]["fits"], p["step_time"]["total_s"]) for p in plans]
    assert keys == sorted(keys) and keys[0][0] is False and keys[-1][0] is True


def test_search_plans_only_what_the_trainer_accepts():
    """tp 8 does not divide 4 heads: refused by the trainer's own check, so not planned."""
    from planner.hardware import hardware
    from planner.search import search

    job = load_config(TINY + ["--parallel.dp=null"])
    plans, refused = search(job, 8, 8, hardware("h100"))
    assert refused and all("parallel.tp (8)" in why for why in refused)
    for c, plan in plans:
        assert with_candidate(job, c).validate(8) == plan.shapes.layout


def test_the_documented_examples_say_what_docs_planner_md_says():
    """docs/planner.md's worked example: Mixtral-size fits 64 H100s as configured at
    micro-batch 1 and not at 2; no layout of 64 holds the DeepSeek-V3-size model, some of 256
    do, all at ZeRO-3."""
    from planner.hardware import hardware
    from planner.plan import make_plan
    from planner.search import search

    h100 = hardware("h100")
    mixtral = load_config(["--config", "configs/plan_mixtral_8x7b.yaml"])
    assert make_plan(mixtral, 64, 8, hw=h100).fits
    mixtral.train.micro_batch_size, mixtral.train.grad_accum = 2, 2
    assert not make_plan(mixtral, 64, 8, hw=h100).fits
    deepseek = load_config(["--config", "configs/plan_deepseek_v3_like.yaml"])
    on64, _ = search(deepseek, 64, 8, h100)
    assert len(on64) == 600 and not any(p.fits for _, p in on64)
    assert min(p.memory.needed for _, p in on64) / 2**30 == pytest.approx(179, abs=0.5)
    on256, _ = search(deepseek, 256, 8, h100)
    fitting = [c for c, p in on256 if p.fits]
    assert fitting and {c.zero_stage for c in fitting} == {3}
