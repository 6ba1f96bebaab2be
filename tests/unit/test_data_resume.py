"""Resuming refuses data that changed since the checkpoint (unless told), lets the same data
move, and no run starts from a checkpoint trained on another tokenizer (checkpoint/compat.py
with the run's Corpus; the metadata is written by trainer/loop.py's save)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from checkpoint.compat import check_compatible
from checkpoint.errors import CheckpointError
from checkpoint.reader import Checkpoint
from launcher.config import load_config
from trainer.data import load_corpus

SMALL = ["--config", "configs/cpu_tiny.yaml", "--data.source=text"]


def _texts(folder: Path) -> Path:
    folder.mkdir()
    for i in range(6):
        (folder / f"part{i}.txt").write_text(f"document {i} " * 400)
    return folder


def _job(path: Path, *extra: str):
    return load_config([*SMALL, f"--data.path={path}", *extra])


def _checkpoint(job, corpus, **meta) -> Checkpoint:
    saved = {"config": job.to_dict(), "samples_seen": 16,
             "data_fingerprint": corpus.fingerprint, "tokenizer": corpus.tokenizer.to_json()}
    return Checkpoint(Path("runs/x/checkpoints/step_00000002"), {"meta": saved | meta})


def test_a_changed_file_is_refused_unless_accepted(tmp_path):
    data = _texts(tmp_path / "data")
    job = _job(data, "--checkpoint.resume=auto")
    ckpt = _checkpoint(job, load_corpus(job.data))
    check_compatible(ckpt, job, load_corpus(job.data))  # the same data
    (data / "part3.txt").write_text("edited " * 400)
    with pytest.raises(CheckpointError, match=r"the training data changed since it was saved \(.*part3\.txt"
                       r".*--checkpoint\.accept_data_change=true"):
        check_compatible(ckpt, job, load_corpus(job.data))
    accepting = _job(data, "--checkpoint.resume=auto", "--checkpoint.accept_data_change=true")
    check_compatible(ckpt, accepting, load_corpus(accepting.data))
    starting = _job(data, f"--checkpoint.init_from={tmp_path}")  # a fine-tune may change data
    check_compatible(ckpt, starting, load_corpus(starting.data))


def test_the_same_data_may_move_but_without_a_fingerprint_the_path_must_stay(tmp_path):
    data = _texts(tmp_path / "data")
    job = _job(data, "--checkpoint.resume=auto")
    ckpt = _checkpoint(job, load_corpus(job.data))
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    there = _job(moved, "--checkpoint.resume=auto")
    check_compatible(ckpt, there, load_corpus(there.data))
    older = Checkpoint(ckpt.path, {"meta": {k: v for k, v in ckpt.meta.items() if k != "data_fingerprint"}})
    with pytest.raises(CheckpointError, match=rf"data.path is {data} in the checkpoint and {moved} here"):
        check_compatible(older, there, load_corpus(there.data))


def test_a_checkpoint_of_another_tokenizer_is_refused_even_to_start_from(tmp_path):
    data = _texts(tmp_path / "data")
    job = _job(data, f"--checkpoint.init_from={tmp_path}")
    corpus = load_corpus(job.data)
    other = {"kind": "hf", "sha256": "ab" * 32, "vocab_size": 4096, "eos_id": 0}
    with pytest.raises(CheckpointError, match=r"trained on data of another tokenizer \(tokenizer.json "
                       r"sha256 abababababab, vocabulary 4096, EOS 0\) than this run's \(bytes\)"):
        check_compatible(_checkpoint(job, corpus, tokenizer=other), job, corpus)
