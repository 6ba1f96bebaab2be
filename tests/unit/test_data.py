"""Corpora, the sharded sampler and eval batches of trainer/data.py."""

from __future__ import annotations

import os
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import ConfigError
from trainer.config import DataConfig
from trainer.data import Corpus, ShardedSampler, eval_batches, is_held_out, load_corpus

HOLDOUT = 0.05


@pytest.fixture(scope="module")
def stdlib() -> Corpus:
    return load_corpus(DataConfig(source="stdlib", holdout_fraction=HOLDOUT))


@pytest.fixture(scope="module")
def stdlib_files() -> dict[str, int]:
    """Relative posix path -> size of every stdlib *.py outside site/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                out[path.relative_to(root).as_posix()] = path.stat().st_size
    return out


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


# ---------------------------------------------------------------- stdlib


def test_stdlib_loads_both_parts(stdlib):
    assert stdlib.train.dtype == torch.uint8 and stdlib.train.ndim == 1
    assert stdlib.num_train_tokens > 1_000_000 and stdlib.num_val_tokens > 10_000
    assert stdlib.num_val_tokens < stdlib.num_train_tokens
    assert stdlib.vocab_size == 256
    assert "held out" in stdlib.description


def test_stdlib_split_by_file_sizes_match(stdlib, stdlib_files):
    files = stdlib_files
    val = {r: s for r, s in files.items() if is_held_out(r, HOLDOUT)}
    train = {r: s for r, s in files.items() if r not in val}
    # Every file is in exactly one part: part length = its files' bytes + one separator each.
    assert stdlib.num_train_tokens == sum(train.values()) + len(train) - 1
    assert stdlib.num_val_tokens == sum(val.values()) + len(val) - 1
    assert f"{len(train)} files" in stdlib.description
    assert f"held out {len(val)} files" in stdlib.description


def test_stdlib_held_out_file_content_only_in_val(stdlib, stdlib_files):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files
    biggest_val = max((r for r in files if is_held_out(r, HOLDOUT)), key=files.get)
    biggest_train = max((r for r in files if not is_held_out(r, HOLDOUT)), key=files.get)
    train, val = _as_bytes(stdlib.train), _as_bytes(stdlib.val)
    held = (root / biggest_val).read_bytes()
    kept = (root / biggest_train).read_bytes()
    assert held in val and held not in train
    assert kept in train and kept not in val


def test_stdlib_deterministic(stdlib):
    again = load_corpus(DataConfig(source="stdlib", holdout_fraction=HOLDOUT))
    assert torch.equal(again.train, stdlib.train) and torch.equal(again.val, stdlib.val)
    assert again.description == stdlib.description


def test_stdlib_excludes_site_packages(tmp_path, monkeypatch):
    (tmp_path / "site-packages" / "pkg").mkdir(parents=True)
    (tmp_path / "site-packages" / "pkg" / "evil.py").write_bytes(b"SITE_MARKER")
    (tmp_path / "dist-packages").mkdir()
    (tmp_path / "dist-packages" / "evil.py").write_bytes(b"DIST_MARKER")
    (tmp_path / "notes.txt").write_bytes(b"TXT_MARKER")
    (tmp_path / "sub").mkdir()
    for i in range(60):
        (tmp_path / ("sub" if i % 2 else "") / f"m{i}.py").write_bytes(f"mod{i}\n".encode())
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    corpus = load_corpus(DataConfig(source="stdlib", holdout_fraction=0.2))
    both = _as_bytes(corpus.train) + _as_bytes(corpus.val)
    for marker in (b"SITE_MARKER", b"DIST_MARKER", b"TXT_MARKER"):
        assert marker not in both
    assert both.count(b"mod") == 60  # nested files are included
    held = [i for i in range(60) if is_held_out(f"{'sub/' if i % 2 else ''}m{i}.py", 0.2)]
    for i in range(60):
        assert (f"mod{i}\n".encode() in _as_bytes(corpus.val)) == (i in held)


def test_is_held_out_stable_and_proportional():
    names = [f"dir/file_{i}.py" for i in range(20_000)]
    share = sum(is_held_out(n, 0.1) for n in names) / len(names)
    assert 0.09 < share < 0.11
    assert is_held_out("a/b.py", 0.3) == is_held_out("a/b.py", 0.3)
    assert not any(is_held_out(n, 0.0) for n in names[:100])


# ---------------------------------------------------------------- text


def test_text_folder_splits_by_file(tmp_path):
    (tmp_path / "deep").mkdir()
    rels = [f"f{i:02d}.txt" if i % 3 else f"deep/f{i:02d}.txt" for i in range(40)]
    for i, rel in enumerate(rels):
        (tmp_path / rel).write_bytes(f"<file {i}>".encode() * 5)
    (tmp_path / "skip.md").write_bytes(b"NOT_TEXT")
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path), holdout_fraction=0.2))
    train, val = _as_bytes(corpus.train), _as_bytes(corpus.val)
    held = {rel for rel in rels if is_held_out(rel, 0.2)}
    assert 0 < len(held) < len(rels)
    for i, rel in enumerate(rels):
        tag = f"<file {i}>".encode()
        assert (tag in val) == (rel in held) and (tag in train) == (rel not in held)
    assert b"NOT_TEXT" not in train + val
    assert corpus.vocab_size == 256 and f"held out {len(held)} files" in corpus.description


def test_text_single_file_holds_out_tail(tmp_path):
    data = bytes(range(256)) * 40
    (tmp_path / "a.txt").write_bytes(data)
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path / "a.txt"),
                                    holdout_fraction=0.1))
    assert corpus.num_val_tokens == int(len(data) * 0.1)
    assert _as_bytes(corpus.train) + _as_bytes(corpus.val) == data


def test_text_folder_degenerate_split_holds_out_tail(tmp_path):
    # Names whose hash keeps them in train at 1%: the file split would leave val empty.
    names = [n for n in (f"x{i}.txt" for i in range(50)) if not is_held_out(n, 0.01)][:2]
    for k, name in enumerate(sorted(names)):
        (tmp_path / name).write_bytes(bytes([65 + k]) * 500)
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path), holdout_fraction=0.01))
    whole = b"A" * 500 + b"\n" + b"B" * 500
    assert corpus.num_val_tokens == int(len(whole) * 0.01)
    assert _as_bytes(corpus.train) + _as_bytes(corpus.val) == whole


def test_text_no_matching_files(tmp_path):
    (tmp_path / "a.md").write_bytes(b"hello")
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(source="text", path=str(tmp_path)))
    assert str(tmp_path) in str(err.value) and "**/*.txt" in str(err.value)


# ---------------------------------------------------------------- tokens


def test_tokens_memmap_round_trip(tmp_path):
    data = (np.arange(5000) * 37 % 60_000).astype(np.uint16)
    data.tofile(tmp_path / "tok.bin")
    corpus = load_corpus(DataConfig(source="tokens", path=str(tmp_path / "tok.bin"),
                                    token_dtype="uint16", holdout_fraction=0.1))
    assert isinstance(corpus.train, np.memmap) and isinstance(corpus.val, np.memmap)
    assert corpus.train.dtype == np.uint16 and corpus.num_val_tokens == 500
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), data)
    assert corpus.vocab_size is None


def test_tokens_bad_size(tmp_path):
    (tmp_path / "tok.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(source="tokens", path=str(tmp_path / "tok.bin"),
                               token_dtype="uint16"))
    assert "7" in str(err.value) and "uint16" in str(err.value)


# ---------------------------------------------------------------- sampler


def _starts(sampler: ShardedSampler, step: int) -> list[int]:
    """Sample indices of a batch, for tokens = arange (first input token = index * L)."""
    inputs, _ = sampler.batch(step)
    return (inputs[:, 0] // sampler.seq_len).tolist()


def test_batch_windows_and_shift():
    tokens = np.arange(1001, dtype=np.int64)  # 125 windows of 8
    s = ShardedSampler(tokens, seq_len=8, micro_batch_size=4, dp_rank=1, dp_size=2, seed=7)
    perm = torch.randperm(125, generator=torch.Generator().manual_seed(7))
    inputs, targets = s.batch(3)
    assert inputs.shape == targets.shape == (4, 8)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    for j in range(4):
        i = int(perm[(3 * 2 + 1) * 4 + j])
        assert inputs[j].tolist() == tokens[i * 8 : i * 8 + 8].tolist()
        assert targets[j].tolist() == tokens[i * 8 + 1 : i * 8 + 9].tolist()


def test_uint8_tensor_and_memmap_agree(tmp_path):
    data = (np.arange(3000) % 251).astype(np.uint8)
    data.tofile(tmp_path / "b.bin")
    mm = np.memmap(tmp_path / "b.bin", dtype=np.uint8, mode="r")
    a = ShardedSampler(torch.from_numpy(data.copy()), 16, 3, 0, 2, seed=1, vocab_size=256)
    b = ShardedSampler(mm, 16, 3, 0, 2, seed=1, vocab_size=256)
    for step in (0, 5, 40):
        for x, y in zip(a.batch(step), b.batch(step)):
            assert torch.equal(x, y)


def test_ranks_disjoint_and_cover_contiguous_block():
    tokens = np.arange(50 * 4 + 1, dtype=np.int32)  # 50 windows of 4
    dp, mbs = 3, 2
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(5)).tolist()
    samplers = [ShardedSampler(tokens, 4, mbs, r, dp, seed=5) for r in range(dp)]
    for step in (0, 1, 7):
        per_rank = [_starts(s, step) for s in samplers]
        flat = [i for rank in per_rank for i in rank]
        assert len(set(flat)) == dp * mbs
        block = range(step * dp * mbs, (step + 1) * dp * mbs)
        assert flat == [perm[g] for g in block]  # rank-major, contiguous in the stream


def test_deterministic_and_seed_dependent():
    tokens = np.arange(2001, dtype=np.int64)
    a = ShardedSampler(tokens, 10, 4, 0, 1, seed=3)
    b = ShardedSampler(tokens, 10, 4, 0, 1, seed=3)
    c = ShardedSampler(tokens, 10, 4, 0, 1, seed=4)
    assert [_starts(a, m) for m in range(10)] == [_starts(b, m) for m in range(10)]
    assert [_starts(a, m) for m in range(10)] != [_starts(c, m) for m in range(10)]
    # Position is a pure function of the step: asking out of order gives the same batch.
    assert _starts(b, 9) == _starts(a, 9) and _starts(b, 0) == _starts(a, 0)


def test_epoch_wrap_each_sample_once_per_epoch():
    tokens = np.arange(12 * 5 + 1, dtype=np.int64)  # 12 windows of 5
    samplers = [ShardedSampler(tokens, 5, 2, r, 2, seed=11) for r in range(2)]
    assert samplers[0].num_samples == 12
    epochs = []
    for e in range(3):  # 4 samples per step -> 3 steps per epoch
        seen = [i for m in range(3 * e, 3 * e + 3) for s in samplers for i in _starts(s, m)]
        assert sorted(seen) == list(range(12))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch


def test_resume_at_another_dp_continues_at_the_first_unseen_sample():
    """The documented policy when dp (or the micro-batch) changes on resume: the global stream
    continues at the first unseen sample, so every sample is seen once per epoch."""
    tokens = np.arange(60 * 4 + 1, dtype=np.int64)  # 60 windows of 4
    seen, position = [], 0
    for dp, mbs, micro_steps in ((4, 2, 3), (2, 3, 4), (3, 1, 4)):  # 24 + 24 + 12 samples
        samplers = [ShardedSampler(tokens, 4, mbs, r, dp, seed=2) for r in range(dp)]
        for _ in range(micro_steps):
            for s in samplers:
                inputs, _ = s.batch_at(position)
                seen += (inputs[:, 0] // 4).tolist()
            position += dp * mbs
    assert sorted(seen) == list(range(60))
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(2)).tolist()
    assert seen == perm  # and in the order of the one global stream


def test_unshuffled_is_identity_order():
    tokens = np.arange(41, dtype=np.int64)
    s = ShardedSampler(tokens, 4, 2, 0, 1, seed=0, shuffle=False)
    assert [_starts(s, m) for m in range(6)] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [0, 1]]


def test_vocab_check_names_token_vocab_and_step():
    tokens = np.zeros(401, dtype=np.int32)
    tokens[200] = 300
    s = ShardedSampler(tokens, 4, 100, 0, 1, seed=0, shuffle=False, vocab_size=256)
    with pytest.raises(ConfigError) as err:
        s.batch(0)
    msg = str(err.value)
    assert "300" in msg and "256" in msg and "global sample 0" in msg
    ShardedSampler(tokens, 4, 100, 0, 1, seed=0, vocab_size=512).batch(0)  # in range: fine


def test_too_few_samples():
    with pytest.raises(ConfigError) as err:
        ShardedSampler(torch.zeros(100, dtype=torch.uint8), 10, 4, 0, 4, seed=0)
    assert "100" in str(err.value) and "10" in str(err.value) and "16" in str(err.value)


# ---------------------------------------------------------------- eval


def test_eval_batches_repeatable_and_disjoint():
    val = np.arange(40 * 8 + 1, dtype=np.int64)  # 40 windows: 2 ranks * 2 mbs * 10 batches
    runs = [eval_batches(val, 8, 2, r, 2, num_batches=10) for r in range(2)]
    again = eval_batches(val, 8, 2, 0, 2, num_batches=10)
    assert all(torch.equal(x, y) for bx, by in zip(runs[0], again) for x, y in zip(bx, by))
    seen = [[int(i) // 8 for x, _ in batches for i in x[:, 0]] for batches in runs]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(40))
    assert seen[0][:4] == [0, 1, 4, 5]  # in order, (m * dp + r) pattern


def test_eval_batches_wrap_when_small():
    val = np.arange(6 * 8 + 1, dtype=np.int64)  # only 6 windows
    runs = [eval_batches(val, 8, 2, r, 2, num_batches=5) for r in range(2)]
    assert [len(b) for b in runs] == [5, 5]
    rank0 = [int(i) // 8 for x, _ in runs[0] for i in x[:, 0]]
    assert rank0 == [0, 1, 4, 5, 2, 3, 0, 1, 4, 5]  # global stream 0..19 mod 6, rank 0's share


def test_token_file_with_ids_beyond_the_vocabulary_is_refused_at_start(tmp_path):
    from trainer.config import TrainConfig
    from trainer.data import rank_data

    ids = np.arange(2000, dtype=np.uint16) % 256
    ids[1500] = 300
    path = tmp_path / "ids.bin"
    ids.tofile(path)
    corpus = load_corpus(DataConfig(source="tokens", path=str(path), holdout_fraction=0.1))
    train = TrainConfig(seq_len=16, micro_batch_size=2, eval_batches=1)
    with pytest.raises(ConfigError, match=r"train data holds token 300, outside \[0, model.vocab_size=256\)"):
        rank_data(corpus, train, vocab_size=256, dp_rank=0, dp_size=1)
    assert len(rank_data(corpus, train, vocab_size=512, dp_rank=0, dp_size=1).val_batches) == 1


def test_a_folder_too_small_for_the_layout_says_what_matched_and_the_fix(tmp_path):
    """Issue 19: *.md files beside two small *.txt files are not read by the default glob;
    the error counts the matched files, names the others and gives the setting to change."""
    from trainer.config import TrainConfig
    from trainer.data import rank_data

    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(b"x" * 300)
    for name in ("guide.md", "notes.md", "sub/more.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"y" * 5000)
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path)))
    with pytest.raises(ConfigError) as err:
        rank_data(corpus, TrainConfig(seq_len=64, micro_batch_size=8), 256, 0, 2)
    assert str(err.value).endswith(
        f"fewer than micro_batch_size * dp_size = 16 needed per step; 2 file(s) in data.path ({tmp_path}) "
        "match data.text_glob ('**/*.txt'); 3 other file(s) do not (e.g. guide.md, notes.md, sub/more.md): "
        "to read them set data.text_glob, e.g. --data.text_glob='**/*.md' or '**/*'")
    wider = load_corpus(DataConfig(source="text", path=str(tmp_path), text_glob="**/*"))
    assert len(rank_data(wider, TrainConfig(seq_len=64, micro_batch_size=8), 256, 0, 2).val_batches) == 8


def test_a_folder_with_no_matching_file_counts_the_others(tmp_path):
    (tmp_path / "a.md").write_bytes(b"hello")
    (tmp_path / "b.md").write_bytes(b"hello")
    with pytest.raises(ConfigError, match=re.escape(
            f"no data: 0 file(s) in data.path ({tmp_path}) match data.text_glob ('**/*.txt'); 2 other file(s) "
            "do not (e.g. a.md, b.md): to read them set data.text_glob, e.g. --data.text_glob='**/*.md' or '**/*'")):
        load_corpus(DataConfig(source="text", path=str(tmp_path)))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no data: the 1 file\(s\) in data.path .* matching data.text_glob \('\*\*/\*.txt'\) are all empty"):
        load_corpus(DataConfig(source="text", path=str(tmp_path)))
