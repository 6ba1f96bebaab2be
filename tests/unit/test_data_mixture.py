"""Prepared datasets at training time (trainer/data/prepared.py, mixture.py, rank.py): the shards
read as one stream, the mixture's deterministic one-number position, bits per byte, and the
refusals at start (ids beyond the vocabulary, another tokenizer, bad weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launcher.env import DistEnv
from launcher.train import prepare as launcher_prepare
from model.errors import ConfigError
from tests.unit.data_setup import run_prepare, split_ids, text_corpus, two_datasets
from trainer.config import DataConfig, TrainConfig
from trainer.data import ShardedSampler, load_corpus, rank_data
from trainer.data.mixture import BLOCK, Mixture, derived_seed
from trainer.data.prepared import ConcatTokens
from trainer.data.sampler import Windows


@pytest.fixture(scope="module", name="two_datasets")
def _two_datasets(tmp_path_factory):
    return two_datasets(tmp_path_factory.mktemp("prepared"), files=40, size=1200, unit_bytes=4000)


def corpus_bytes(path, split) -> int:
    return json.loads((path / "meta.json").read_text())[split]["bytes"]


def _mixture(a, b, weights="3,1") -> DataConfig:
    return DataConfig(source="prepared", path=f"{a},{b}", weights=weights)


def test_concat_tokens_index_like_one_array():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 500, n).astype(np.uint16) for n in (7, 1, 30, 12)]
    cat = ConcatTokens(arrays, np.uint16, ["x"] * 4, [int(a.max()) for a in arrays])
    whole = np.concatenate(arrays)
    assert len(cat) == len(whole) == 50
    idx = rng.integers(0, 50, (6, 9))
    np.testing.assert_array_equal(cat[idx], whole[idx])
    np.testing.assert_array_equal(cat[5:40], whole[5:40])  # spans three arrays
    with pytest.raises(IndexError):
        cat[np.array([50])]


def test_one_prepared_dataset_samples_like_its_tokens_in_one_array(two_datasets):
    a, _ = two_datasets
    corpus = load_corpus(DataConfig(source="prepared", path=str(a)))
    whole = split_ids(a, "train")
    assert len(corpus.train.arrays) > 1 and len(corpus.train) == len(whole)
    ours = ShardedSampler(corpus.train, 32, 4, 1, 2, seed=5)
    ref = ShardedSampler(torch.from_numpy(whole), 32, 4, 1, 2, seed=5)
    for step in (0, 3, 50):
        for x, y in zip(ours.batch(step), ref.batch(step)):
            assert torch.equal(x, y)
    assert corpus.val_bytes_per_token == pytest.approx(corpus_bytes(a, "val") / len(split_ids(a, "val")))


def test_mixture_draws_each_block_by_weight_from_each_dataset_in_its_own_order(two_datasets):
    a, b = two_datasets
    corpus = load_corpus(_mixture(a, b))
    sampler = ShardedSampler(corpus.train, 16, 8, 0, 1, seed=7)
    parts = [Windows(p, 16, derived_seed(7, "part", k)) for k, p in enumerate(corpus.train.parts)]
    taken = [[], []]
    for g in range(2 * BLOCK):
        k, j = sampler.stream.locate(g)
        taken[k].append(j)
    assert [len(t) for t in taken] == [1536, 512]  # 3:1 in each block of 1024
    assert taken == [list(range(1536)), list(range(512))]  # each dataset's samples in order
    x, y = sampler.batch(5)  # global samples 40..47
    for row, g in enumerate(range(40, 48)):
        k, j = sampler.stream.locate(g)
        window = parts[k].read([j])[0]
        assert torch.equal(x[row], window[:-1]) and torch.equal(y[row], window[1:])


def test_mixture_position_is_one_number_at_any_dp(two_datasets):
    """Rank r at dp D reads global samples first + r * mbs + j: the union over ranks of a
    micro-step equals one rank's batch of dp 1 with D x mbs, so resuming at another dp continues."""
    a, b = two_datasets
    corpus = load_corpus(_mixture(a, b, "1,2"))
    one = ShardedSampler(corpus.train, 16, 12, 0, 1, seed=3)
    for dp, mbs in ((2, 6), (3, 4), (4, 3)):
        for first in (0, 12, 1020, 5000):
            got = torch.cat([ShardedSampler(corpus.train, 16, mbs, r, dp, seed=3).batch_at(first)[0] for r in range(dp)])
            assert torch.equal(got, one.batch_at(first)[0]), (dp, first)
    again = load_corpus(_mixture(a, b, "1,2"))
    assert torch.equal(ShardedSampler(again.train, 16, 12, 0, 1, seed=3).batch_at(777)[0], one.batch_at(777)[0])
    assert not torch.equal(ShardedSampler(corpus.train, 16, 12, 0, 1, seed=4).batch_at(777)[0], one.batch_at(777)[0])


def test_bits_per_byte_ratio_of_the_held_out_data(two_datasets):
    a, b = two_datasets
    train = TrainConfig(seq_len=16, micro_batch_size=4, eval_batches=3)
    ratio = {p: corpus_bytes(p, "val") / len(split_ids(p, "val")) for p in (a, b)}
    single = rank_data(load_corpus(DataConfig(source="prepared", path=str(a))), train, 257, 0, 2)
    assert single.val_bytes_per_token == pytest.approx(ratio[a])
    data = rank_data(load_corpus(_mixture(a, b)), train, 257, 1, 2)
    stream = ShardedSampler(load_corpus(_mixture(a, b)).val, 16, 4, 0, 2, seed=0, shuffle=False).stream
    counts = [0, 0]
    for g in range(3 * 4 * 2):  # every rank's eval samples
        counts[stream.locate(g)[0]] += 1
    assert data.val_bytes_per_token == pytest.approx((counts[0] * ratio[a] + counts[1] * ratio[b]) / 24)
    assert 0 < counts[1] < counts[0]
    stdlib = load_corpus(DataConfig(source="stdlib"))
    assert rank_data(stdlib, train, 256, 0, 1).val_bytes_per_token == 1.0  # bpb = loss / ln 2


def test_token_beyond_the_vocabulary_is_refused_naming_the_shard(two_datasets):
    a, b = two_datasets
    with pytest.raises(ConfigError, match=r"train data holds token 256 \(in train-0000\d.bin\), outside "
                                          r"\[0, model.vocab_size=256\): .*/a"):
        rank_data(load_corpus(_mixture(a, b)), TrainConfig(seq_len=16, micro_batch_size=2), 256, 0, 1)


def test_another_tokenizer_is_refused(two_datasets, tmp_path):
    a, _ = two_datasets
    text_corpus(tmp_path / "in", 6)
    run_prepare("--input", str(tmp_path / "in"), "--output", str(tmp_path / "bpe"),
                "--train-tokenizer", "bpe", "--vocab-size", "270")
    with pytest.raises(ConfigError, match=r"bpe was prepared with another tokenizer \(tokenizer.json sha256 .*, "
                                          r"vocab 270, EOS id 0\) than .*/a \(bytes, vocab 257, EOS id 256\)"):
        load_corpus(_mixture(a, tmp_path / "bpe", "1,1"))
    with pytest.raises(ConfigError, match=r"/a was prepared with another tokenizer \(bytes, vocab 257, EOS id 256\) "
                                          r"than data.tokenizer .*tokenizer.json \(tokenizer.json sha256"):
        load_corpus(DataConfig(source="prepared", path=str(a), tokenizer=str(tmp_path / "bpe" / "tokenizer.json")))
    assert load_corpus(DataConfig(source="prepared", path=str(a), tokenizer="bytes")).tokenizer.eos_id == 256


@pytest.mark.parametrize("weights, message", [
    ("3,0", r"data.weights: the weight of .*/b \(0.0\) must be a finite number > 0"),
    ("1,-2", r"data.weights: the weight of .*/b \(-2.0\) must be a finite number > 0"),
    ("1", r"data.weights \('1'\) has 1 weight\(s\), data.path has 2 dataset\(s\)"),
    ("1,x", r"data.weights \('1,x'\) must be numbers separated by commas"),
    (None, r"data.weights is required with several datasets in data.path \(2: "),
    ("5000,1", r"mixture weight of .*/b \(1.0 of 5001.0\) is below 1/1024 of the total"),
])
def test_bad_weights_are_refused_on_every_rank_before_any_group(two_datasets, tmp_path, weights, message):
    """Through the launcher's prepare() (no process group), as ranks 0 and 1 of a world of 2."""
    a, b = two_datasets
    args = ["--config", "configs/cpu_tiny.yaml", "--parallel.dp=2", "--parallel.ep=2", "--model.vocab_size=257",
            "--data.source=prepared", f"--data.path={a},{b}", f"--logging.run_dir={tmp_path}"]
    args += [f"--data.weights={weights}"] if weights is not None else []
    for rank in (0, 1):
        with pytest.raises(ConfigError, match=message):
            launcher_prepare(args, DistEnv(rank, rank, 2, 2, "127.0.0.1", 1, "torchrun"))


def test_weights_and_tokenizer_are_for_prepared_data_only():
    with pytest.raises(ConfigError, match=r"data.weights \(1,2\) is for data.source=prepared, not 'stdlib'"):
        DataConfig(weights="1,2").validate()
    with pytest.raises(ConfigError, match=r"data.path \(/no/such\) does not exist"):
        DataConfig(source="prepared", path="/tmp,/no/such", weights="1,1").validate()


def test_a_mixture_part_needs_one_window():
    tiny = Mixture([torch.zeros(10, dtype=torch.uint8), torch.zeros(100, dtype=torch.uint8)], [1, 1],
                   ["tiny", "ok"], [1.0, 1.0])
    with pytest.raises(ConfigError, match=r"tiny has 10 tokens, not one window of seq_len 16"):
        ShardedSampler(tiny, 16, 2, 0, 1, seed=0)
