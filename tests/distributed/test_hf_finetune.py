"""The round trip of docs/hf.md through the real entry points: scripts/tiny_hf_model.py builds
a byte-level HF directory, `moe-run ... --config configs/hf_finetune.yaml
--checkpoint.init_from=hf:DIR --checkpoint.export_hf=OUT` fine-tunes it on 2 ranks (dp 2 x
ep 2, no model section anywhere) and exports it; the held-out loss falls, and transformers
loads the export and computes what our final checkpoint computes. A bad directory fails on
every rank with exit code 4 before any collective."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.distributed.launch import torchrun
from tests.distributed.test_launcher import _prefix, launch_ranks
from tests.tolerance import close
from tests.unit.hf_tiny import tiny_script

CONFIG = "configs/hf_finetune.yaml"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_finetune")
    tiny_script().build(root / "hf", "qwen2_moe", max_shard_size="200KB")
    proc = torchrun(2, "--config", CONFIG, f"--checkpoint.init_from=hf:{root / 'hf'}",
                    f"--checkpoint.export_hf={root / 'export'}", "--parallel.dp=2", "--parallel.ep=2",
                    "--train.steps=20", "--train.eval_interval=5", "--train.seq_len=64",
                    "--train.micro_batch_size=4", "--train.eval_batches=2", "--train.lr=3e-3",
                    f"--logging.run_dir={root / 'run'}", "--logging.tensorboard=false",
                    "--logging.heatmap_interval=0", runner="launcher.agent", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc


@pytest.mark.distributed
@pytest.mark.slow
def test_finetune_from_an_hf_directory_learns_and_exports(finetuned):
    import transformers as tf

    from checkpoint.hf.export import configs_of, open_run_checkpoint
    from checkpoint.load import load_weights
    from model.transformer import TransformerLM

    root, proc = finetuned
    summary = json.loads((root / "run" / "summary.json").read_text())
    evals = [e["eval_loss"] for e in summary["evals"]]
    assert evals[-1] < evals[0] < math.log(256) + 0.1, evals  # from a random model's ln(256)
    assert f"weights from {root / 'hf'} (qwen2_moe)" in proc.stdout
    assert f"exported the final weights as an HF directory: {root / 'export'}" in proc.stdout

    ckpt = open_run_checkpoint(root / "run")
    assert ckpt.step == 20 and ckpt.meta["model_source"]["hf_dir"] == str((root / "hf").resolve())
    ours = TransformerLM(*configs_of(ckpt))
    load_weights(ckpt, ours)
    model, info = tf.AutoModelForCausalLM.from_pretrained(root / "export", output_loading_info=True)
    assert not any(info.values()), info
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    close(ours.eval()(tokens).logits, model.eval()(tokens).logits, 2e-5, "logits of the export")


@pytest.mark.distributed
def test_a_directory_without_config_json_fails_on_every_rank_before_any_collective(tmp_path):
    # MASTER_PORT=1 cannot be joined: a rank that got as far as a collective would fail
    # differently, so exit code 4 and the message prove the check came first.
    (tmp_path / "hf").mkdir()
    results = launch_ranks(2, "--config", CONFIG, f"--checkpoint.init_from=hf:{tmp_path / 'hf'}",
                           "--parallel.dp=2", "--parallel.ep=2", f"--logging.run_dir={tmp_path / 'run'}")
    for rank, (code, _, err) in enumerate(results):
        assert code == 4, err[-3000:]
        assert f"{_prefix(rank)}checkpoint error: {tmp_path / 'hf'} has no config.json" in err, err[-3000:]
        assert "Traceback" not in err
