"""The export writer: shards within the size limit, each of our tensors read once, a family
chosen or refused by what it can express, and nothing half-written. (From checkpoints of
every layout, bit for bit, and loaded by transformers: tests/distributed/test_hf_import.py.)"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from checkpoint.errors import CheckpointError
from checkpoint.hf import FAMILIES, build_table, hf_to_ours
from checkpoint.hf.export import choose_family, shard_plan, write_hf_dir
from launcher import exit_codes
from launcher.export_hf import main, parse_size
from model.config import ModelConfig, MoEConfig
from model.errors import ConfigError
from tests.unit.hf_tiny import per_expert_state, tiny_hf


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """(family, model config, moe config, our tensors, the per-expert HF tensors)."""
    model = tiny_hf("qwen2_moe")
    family = FAMILIES["qwen2_moe"]
    model_cfg, moe_cfg = family.config_from_hf(model.config.to_dict())
    hf = per_expert_state(model, tmp_path_factory.mktemp("qwen2"))
    return family, model_cfg, moe_cfg, hf_to_ours(family, hf, model_cfg, moe_cfg), hf


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_shards_hold_at_most_the_limit_and_each_of_ours_is_read_once(qwen2, tmp_path, layout):
    family, model_cfg, moe_cfg, ours, _ = qwen2
    table = build_table(family, model_cfg, moe_cfg, layout)
    limit = 20_000
    plan = shard_plan(table, torch.float32, limit)
    assert sorted(n for names in plan for n in names) == sorted(table.hf_shapes)
    for names in plan:
        sizes = [4 * torch.Size(table.hf_shapes[n]).numel() for n in names]
        assert sum(sizes) <= limit or len(names) == 1, (names, sizes)
    reads = []
    out = write_hf_dir(tmp_path / "out", {"model_type": "qwen2_moe"}, table,
                       lambda name: reads.append(name) or ours[name], torch.float32, limit, progress=False)
    assert sorted(reads) == sorted(ours)  # one read per tensor of ours, fused gate_up_proj too
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == len(plan) > 1 and set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:
        held = load_file(f)
        assert f.stat().st_size <= limit + 4096 or len(held) == 1  # + the safetensors header
        assert all(index["weight_map"][n] == f.name for n in held)
    assert index["metadata"]["total_size"] == sum(4 * t.numel() for f in files for t in load_file(f).values())


def test_a_cast_export_and_a_failed_one(qwen2, tmp_path):
    """--dtype casts every tensor; a failure midway leaves neither OUT nor OUT.partial."""
    family, model_cfg, moe_cfg, ours, hf = qwen2
    table = build_table(family, model_cfg, moe_cfg, "per_expert")
    out = write_hf_dir(tmp_path / "bf16", {}, table, ours.__getitem__, torch.bfloat16, progress=False)
    got = load_file(out / "model.safetensors")
    assert got.keys() == hf.keys() and all(torch.equal(got[n], hf[n].bfloat16()) for n in hf)

    def broken(name):
        if name.startswith("layers.1."):
            raise RuntimeError("disk went away")
        return ours[name]

    with pytest.raises(RuntimeError, match="disk went away"):
        write_hf_dir(tmp_path / "failed", {}, table, broken, torch.float32, 20_000, progress=False)
    assert not (tmp_path / "failed").exists() and not (tmp_path / "failed.partial").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="export directory .*full exists and is not empty"):
        write_hf_dir(tmp_path / "full", {}, table, ours.__getitem__, torch.float32, progress=False)


def test_the_family_is_one_that_can_express_the_model():
    plain = ModelConfig(dim=32, n_heads=4, n_layers=2)
    assert choose_family(plain, MoEConfig()).model_type == "mixtral"
    assert choose_family(dataclasses.replace(plain, qk_norm="head"), MoEConfig()).model_type == "qwen3_moe"
    assert choose_family(plain, MoEConfig(shared_expert_hidden=32, shared_expert_gate=True)).model_type == "qwen2_moe"
    assert choose_family(dataclasses.replace(plain, qk_norm="proj"), MoEConfig()).model_type == "olmoe"
    with pytest.raises(ConfigError, match=r"cannot be exported: mixtral cannot express .*moe.shared_expert_hidden"
                                          r".*; qwen2_moe cannot express moe.shared_expert_gate \(False"):
        choose_family(plain, MoEConfig(shared_expert_hidden=32))
    with pytest.raises(ConfigError, match=r"^the model cannot be exported: olmoe cannot express model.qk_norm \('none'"):
        choose_family(plain, MoEConfig(), "olmoe")


def test_moe_export_exit_codes(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == exit_codes.CHECKPOINT
    assert "moe-export: checkpoint error: checkpoint " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert (parse_size("5GB"), parse_size("64KiB"), parse_size("1000")) == (5 * 10**9, 65536, 1000)
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "out"), "--max-shard-size=lots"])


def test_a_checkpoint_error_names_the_checkpoint(tmp_path):
    from checkpoint.hf.export import open_run_checkpoint

    with pytest.raises(CheckpointError, match=f"{tmp_path} holds no committed checkpoint"):
        open_run_checkpoint(tmp_path)
