"""Starting from an HF directory: config.json fills what the run left out and refuses a clash;
bad files are refused in prepare(), before any process group exists, as a CheckpointError
(exit code 4) naming what is wrong, on every rank alike (here ranks 0 and 1 of a world of 2,
in this process; tests/distributed/test_hf_finetune.py runs one as real processes)."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint.errors import CheckpointError
from checkpoint.hf import FAMILIES
from checkpoint.hf.hf_dir import open_hf_dir
from checkpoint.hf.start import start_from_hf
from launcher import exit_codes
from launcher.config import load_config
from launcher.env import DistEnv
from launcher.train import prepare
from tests.unit.hf_tiny import hf_config, tiny_hf, write_dirs

FAMILY = "qwen3_moe"  # head_dim 16 (not 32 / 4), QK-norm, every other block dense


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_files")
    out = write_dirs(tiny_hf(FAMILY), root / FAMILY)
    np.random.default_rng(0).integers(0, 96, 20_000, dtype=np.uint8).tofile(root / "tokens.bin")
    return root, out


def _args(root, hf_dir, *extra):
    return [f"--checkpoint.init_from=hf:{hf_dir}", "--parallel.dp=2", "--parallel.ep=2",
            "--train.seq_len=16", "--train.micro_batch_size=2", "--data.source=tokens",
            f"--data.path={root / 'tokens.bin'}", "--data.token_dtype=uint8",
            f"--logging.run_dir={root / 'run'}", *extra]


def test_config_json_fills_what_the_run_left_out(dirs):
    root, out = dirs
    job = load_config(_args(root, out["per_expert"], "--moe.aux_loss_coef=0.05", "--model.dim=32",
                            "--moe.expert_impl=loop"))
    start = start_from_hf(job)
    model, moe = FAMILIES[FAMILY].config_from_hf(hf_config(FAMILY).to_dict())
    assert job.model == model  # every model field; dim was set to the file's own value
    assert (job.moe.num_experts, job.moe.top_k, job.moe.expert_hidden, job.moe.every_n_layers,
            job.moe.renormalize, job.moe.aux_loss_form) == (4, 2, 16, 2, True, "pooled")
    assert job.moe.aux_loss_coef == 0.05 and job.moe.expert_impl == "loop"  # run settings stay
    assert set(start.table.links) == {n for n, _ in _named(job.model, job.moe)}


def _named(model, moe):
    from model.transformer import TransformerLM

    with torch.device("meta"):
        return list(TransformerLM(model, moe).named_parameters())


CLASHES = [
    ("--model.dim=64", r"model.dim is 64 here and 32 in .*config.json \(hidden_size 32\)"),
    ("--moe.num_experts=8", r"moe.num_experts is 8 here and 4 in .*config.json \(num_experts 4\)"),
    ("--model.head_dim=8", r"model.head_dim is 8 here and 16 in .*config.json \(head_dim 16\)"),
]


@pytest.mark.parametrize("arg, message", CLASHES, ids=[a for a, _ in CLASHES])
def test_a_clash_with_config_json_names_both_values(dirs, arg, message):
    root, out = dirs
    with pytest.raises(CheckpointError, match=message):
        start_from_hf(load_config(_args(root, out["per_expert"], arg)))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shard_of(folder, tensor):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def _rewrite(folder, tensor, change):
    """Replace the file holding `tensor` with change(its tensors)."""
    file = folder / _shard_of(folder, tensor)
    tensors = change(load_file(file))
    save_file(tensors, str(file), metadata={"format": "pt"})
    return tensors


def _missing_shard(d):
    (d / _shard_of(d, "model.layers.0.mlp.down_proj.weight")).unlink()
    return r"model-000\d\d-of-000\d\d.safetensors is missing: model.safetensors.index.json places \d+ tensors there"


def _misshapen(d):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(d, name, lambda t: t | {name: t[name][:, :31].contiguous()})
    return rf"HF tensor {name} has shape \[32, 31\], expected \[32, 32\]"


def _unused(d):
    name = "model.layers.1.mlp.experts.4.up_proj.weight"  # a fifth expert the config lacks
    shard = _shard_of(d, "model.layers.1.mlp.gate.weight")
    _rewrite(d, "model.layers.1.mlp.gate.weight", lambda t: t | {name: torch.zeros(16, 32)})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return rf"unused \(1\): {name}$"


def _not_in_index(d):
    name = "model.layers.0.extra.weight"
    _rewrite(d, "model.norm.weight", lambda t: t | {name: torch.zeros(2)})
    return rf"index.json does not match the files: {name} is in model-000\d\d-of-000\d\d.safetensors, the index says nothing"


def _unsupported(d):
    config = json.loads((d / "config.json").read_text()) | {"attention_bias": True}
    (d / "config.json").write_text(json.dumps(config))
    return r"config.json: qwen3_moe attention_bias=True cannot be represented"


def _no_config(d):
    (d / "config.json").unlink()
    return r"has no config.json: not an HF model directory"


def _truncated(d):
    file = d / _shard_of(d, "model.embed_tokens.weight")
    file.write_bytes(file.read_bytes()[:-100])
    return r"is not a readable safetensors file: .*incomplete metadata"


def _unknown_type(d):
    config = json.loads((d / "config.json").read_text()) | {"model_type": "llama"}
    (d / "config.json").write_text(json.dumps(config))
    return r"config.json: HF model_type 'llama' is not supported; supported: mixtral, qwen2_moe"


BAD = [_missing_shard, _misshapen, _unused, _not_in_index, _unsupported, _no_config, _truncated,
       _unknown_type]


@pytest.mark.parametrize("spoil", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_files_are_refused_in_prepare_on_every_rank(dirs, tmp_path, spoil):
    root, out = dirs
    folder = _copy(out["per_expert"], tmp_path / "hf")
    message = spoil(folder)
    for rank in (0, 1):
        with pytest.raises(CheckpointError, match=message) as err:
            prepare(_args(root, folder), DistEnv(rank, rank, 2, 2, "127.0.0.1", 1, "torchrun"))
        assert exit_codes.code_for(err.value) == exit_codes.CHECKPOINT
    assert not torch.distributed.is_initialized()


def test_both_layouts_and_a_single_file_open_to_the_same_tensors(dirs, tmp_path):
    """save_pretrained's shards with an index, one file without, and the fused layout: each
    names every tensor it holds, and a slice read lazily equals that slice of the file."""
    _, out = dirs
    single = tmp_path / "single"
    single.mkdir()
    tensors = {}
    for file in out["per_expert"].glob("*.safetensors"):
        tensors |= load_file(file)
    save_file(tensors, str(single / "model.safetensors"))
    shutil.copy(out["per_expert"] / "config.json", single)
    for folder, want in ((out["per_expert"], tensors), (single, tensors),
                         (out["fused"], load_file(out["fused"] / "model.safetensors"))):
        source = open_hf_dir(folder).source
        assert set(source.names()) == set(want)
        for name, t in want.items():
            index = tuple(slice(n // 2, n) for n in t.shape)
            assert source.shape(name) == tuple(t.shape)
            assert torch.equal(source.read(name, index), t[index]), (folder.name, name)
