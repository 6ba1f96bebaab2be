"""moe-generate and its sampling: the filters equal transformers' logits warpers; greedy
decoding of an HF directory equals transformers' `generate` token for token, as ids, as bytes
and through a BPE tokenizer; and scripts/tiny_hf_model.py builds directories both read alike.
(On one of our checkpoints: tests/distributed/test_hf_import.py.)"""

import hashlib
import json

import pytest
import torch

from checkpoint.hf.hf_dir import open_hf_dir
from checkpoint.hf.start import load_hf_model
from launcher import exit_codes
from launcher.generate import main
from model.sampling import filter_logits, sampler
from tests.tolerance import close
from tests.unit.hf_tiny import tiny_hf, tiny_script, write_dirs

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
WARPS = [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 10, 0.5), (0.5, 0, 0.05), (2.0, 40, 1.0)]


@pytest.mark.parametrize("temperature, top_k, top_p", WARPS)
def test_filters_equal_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation import logits_process as lp

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :10] = logits[0, 10]  # ties at the top-k boundary stay, as in transformers
    want = lp.TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        want = lp.TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = lp.TopPLogitsWarper(top_p)(None, want)
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[~got.isinf()], want[~want.isinf()])


def test_sampling_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    assert torch.equal(sampler()(logits), torch.tensor([[0]]))  # temperature 0: greedy
    pick = sampler(1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    draws = torch.cat([pick(logits) for _ in range(4000)]).flatten()
    assert set(draws.tolist()) <= {0, 1, 2}
    freq = torch.bincount(draws, minlength=6)[:3].float() / len(draws)
    want = logits[0, :3].softmax(-1)
    assert (freq - want).abs().max() < 0.03, (freq, want)  # 4000 draws: 3 sigma is about 0.023
    again = sampler(1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([again(logits) for _ in range(4000)]).flatten(), draws)
    with pytest.raises(ValueError, match=r"top_p \(0\) must be in \(0, 1\]"):
        filter_logits(logits, 1.0, 0, 0)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each family's tiny model (fused layout) and its transformers model."""
    root = tmp_path_factory.mktemp("generate")
    out = {}
    for family in FAMILIES:
        model = tiny_hf(family)
        out[family] = (write_dirs(model, root / family)["fused"], model)
    return out


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*map(str, argv), "--device=cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_moe_generate_equals_transformers_generate(hf_dirs, capsys, family):
    folder, hf = hf_dirs[family]
    prompt = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(2))
    want = hf.generate(prompt, max_new_tokens=32, do_sample=False)[0].tolist()
    code, out, err = _run(capsys, folder, "--prompt-ids", ",".join(map(str, prompt[0].tolist())),
                          "--max-new-tokens", 32, "--ids", "--num-samples", 2)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [want, want]


def test_moe_generate_refuses_what_it_cannot_do(hf_dirs, capsys):
    folder, _ = hf_dirs["mixtral"]
    cases = [([], "give the prompt as --prompt TEXT or as --prompt-ids"),
             (["--prompt", "hi"], "the model has 96 tokens and no tokenizer: give --tokenizer"),
             (["--prompt-ids", "1,96"], r"the prompt's token ids [96] must be 1 or more ids in [0, 96)"),
             (["--prompt-ids", "1,2", "--max-new-tokens", 63],
              "the prompt (2 tokens) and --max-new-tokens (63) exceed model.max_seq_len (64)")]
    for args, message in cases:
        code, _, err = _run(capsys, folder, *args)
        assert code == exit_codes.CONFIG and message in err, err
    code, _, err = _run(capsys, folder.parent / "nowhere", "--prompt-ids", "1")
    assert code == exit_codes.CHECKPOINT and "does not exist" in err, err


@pytest.fixture(scope="module")
def script_dirs(tmp_path_factory):
    """scripts/tiny_hf_model.py's directories: byte-level (per expert, in shards) and with a
    BPE tokenizer (fused)."""
    script, root = tiny_script(), tmp_path_factory.mktemp("script")
    bytes_model = script.build(root / "bytes", "olmoe", max_shard_size="100KB", layers=1)
    bpe_model = script.build(root / "bpe", "qwen3_moe", "bpe", vocab_size=300, layout="fused",
                             max_text_bytes=200_000, layers=1)
    return {"bytes": (root / "bytes", bytes_model), "bpe": (root / "bpe", bpe_model)}


def test_the_script_builds_directories_ours_and_transformers_read_alike(script_dirs):
    for name, (folder, hf) in script_dirs.items():
        ours, opened = load_hf_model(folder)
        tokens = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
        close(ours.eval()(tokens).logits, hf.eval()(tokens).logits, 2e-5, f"{name} logits")
        assert opened.config["model_type"] == hf.config.model_type
    assert len(list(script_dirs["bytes"][0].glob("model-*.safetensors"))) > 1
    assert open_hf_dir(script_dirs["bytes"][0]).tokenizer_files == []
    folder, hf = script_dirs["bpe"]
    opened = open_hf_dir(folder)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(opened.tokenizer_files)
    assert hf.config.vocab_size == 300 and hf.config.eos_token_id == 0
    want = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    assert opened.tokenizer_sha256 == opened.record()["tokenizer_sha256"] == want
    # The identity a dataset prepared with this directory's tokenizer records.
    from trainer.data.tokenizer import load_tokenizer

    assert load_tokenizer(str(folder)).info.sha256 == want


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_text_goes_through_the_tokenizer_or_bytes(script_dirs, capsys, kind):
    """The prompt encoded, 24 greedy tokens, decoded: the text transformers' generate gives
    (stopping at the end-of-sequence token where the model has one)."""
    from transformers import AutoTokenizer

    folder, hf = script_dirs[kind]
    prompt = "def add(a, b):\n    return"
    if kind == "bytes":
        ids = list(prompt.encode())
        want = bytes(hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0].tolist()
                     ).decode("utf-8", errors="replace")
    else:
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok(prompt)["input_ids"]
        out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0].tolist()
        want = tok.decode(out)
    code, out, err = _run(capsys, folder, "--prompt", prompt, "--max-new-tokens", 24)
    assert code == 0, err
    assert out == want + "\n"
    assert out.startswith(prompt)
