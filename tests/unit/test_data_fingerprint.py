"""The fingerprint of a run's data (trainer/data/fingerprint.py) and fingerprint_change."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig

import pytest

from tests.unit.data_setup import run_prepare, text_corpus
from trainer.config import DataConfig
from trainer.data import fingerprint_change, load_corpus
from trainer.data.fingerprint import SAMPLE_BYTES, WHOLE_BYTES, fingerprint_files


def _fp(root, rels):
    return fingerprint_files([(root, rels)])


def test_unchanged_data_is_the_same_even_touched_or_moved(tmp_path):
    files = sorted(text_corpus(tmp_path / "a", 8))
    saved = _fp(tmp_path / "a", files)
    assert json.loads(json.dumps(saved)) == saved  # JSON as it is
    os.utime(tmp_path / "a" / files[0], (1, 1))
    assert fingerprint_change(saved, _fp(tmp_path / "a", files)) is None
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert fingerprint_change(saved, _fp(tmp_path / "moved", files)) is None
    assert fingerprint_change(None, saved) is None  # nothing recorded: nothing to compare


def test_each_kind_of_change_names_the_file(tmp_path):
    files = sorted(text_corpus(tmp_path, 8))
    saved = _fp(tmp_path, files)
    edited, grown, gone = files[1], files[2], files[3]
    data = bytearray((tmp_path / edited).read_bytes())
    data[5] ^= 1
    (tmp_path / edited).write_bytes(bytes(data))
    with open(tmp_path / grown, "ab") as f:
        f.write(b"more")
    (tmp_path / gone).unlink()
    (tmp_path / "new.txt").write_text("new")
    now = [f for f in files if f != gone] + ["new.txt"]
    message = fingerprint_change(saved, _fp(tmp_path, now))
    size = (tmp_path / grown).stat().st_size
    assert message.startswith("the data changed in 4 file(s): ")
    assert f"{tmp_path / edited} has other content (same size, sampled hash differs)" in message
    assert f"{tmp_path / grown} has {size} bytes, {size - 4} before" in message
    assert f"{tmp_path / gone} is gone" in message and f"{tmp_path / 'new.txt'} is new" in message


def test_a_large_file_is_sampled_not_read_whole(tmp_path):
    path = tmp_path / "big.bin"
    size = 8 * WHOLE_BYTES
    path.write_bytes(bytes(size))
    saved = _fp(tmp_path, ["big.bin"])
    with open(path, "r+b") as f:  # inside the last sampled block (which ends at the last byte)
        f.seek(size - SAMPLE_BYTES // 2)
        f.write(b"\x01")
    assert "big.bin has other content" in fingerprint_change(saved, _fp(tmp_path, ["big.bin"]))


def test_more_data_locations_than_before(tmp_path):
    text_corpus(tmp_path / "a", 2)
    one = fingerprint_files([(tmp_path / "a", ["doc001.txt"])])
    two = fingerprint_files([(tmp_path / "a", ["doc001.txt"]), (tmp_path / "a", ["doc001.txt"])])
    assert fingerprint_change(one, two).startswith("the run read 1 data location(s)")


def test_corpus_fingerprints_cover_what_each_source_reads(tmp_path, monkeypatch):
    text_corpus(tmp_path / "in", 12)
    meta = run_prepare("--input", str(tmp_path / "in"), "--output", str(tmp_path / "ds"), "--unit-bytes", "2000",
                       "--holdout-fraction", "0.3")
    prepared = load_corpus(DataConfig(source="prepared", path=str(tmp_path / "ds")))
    text = load_corpus(DataConfig(source="text", path=str(tmp_path / "in")))
    shards = {s[split]["file"] for s in meta["shards"] for split in ("train", "val")} - {None}
    assert set(prepared.fingerprint["roots"][0]["files"]) == shards | {"meta.json"}
    assert any(name.startswith("val-") for name in shards)
    assert len(text.fingerprint["roots"][0]["files"]) == 12
    shard = tmp_path / "ds" / "train-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x05\x00")  # same size, another last token
    again = load_corpus(DataConfig(source="prepared", path=str(tmp_path / "ds")))
    assert fingerprint_change(prepared.fingerprint, again.fingerprint) == (
        f"the data changed in 1 file(s): {shard} has other content (same size, sampled hash differs)")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "in")})
    modules = [f"m{i}.py" for i in range(6)]
    for name in modules:
        (tmp_path / "in" / name).write_text(f"{name} = 1\n")
    stdlib = load_corpus(DataConfig(source="stdlib", holdout_fraction=0.5))
    assert sorted(stdlib.fingerprint["roots"][0]["files"]) == modules


@pytest.mark.parametrize("saved_version", [0, 2])
def test_another_fingerprint_version_is_not_compared_silently(tmp_path, saved_version):
    text_corpus(tmp_path, 1)
    now = _fp(tmp_path, ["sub/doc000.txt"])
    assert "cannot be compared" in fingerprint_change(now | {"version": saved_version}, now)
