"""moe-prepare-data (trainer/data/prepare.py): what it writes equals the tokenizer's output on
the same documents, with EOS after each; formats, tokenizers, splits, dtype; the same output
at any worker count; a stopped run finishes without redoing finished shards."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from launcher import exit_codes
from model.errors import ConfigError
from tests.unit.data_setup import documents, files_state, run_prepare, split_ids, text_corpus
from trainer.data import documents as documents_module
from trainer.data import prepare, worker
from trainer.data.split import is_held_out
from trainer.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _expected_docs(files: dict[str, bytes], fraction: float, held: bool) -> list[list[int]]:
    """Byte-tokenized text files of one split, in sorted order, empty ones left out."""
    return [list(data) for rel, data in sorted(files.items()) if data and is_held_out(rel, fraction) == held]


def test_text_folder_with_bytes_round_trips_across_pieces_and_blocks(tmp_path, monkeypatch):
    """Files cut into several units (--unit-bytes) and read in blocks (BLOCK) come back
    whole: each split's stream is its documents, each followed by EOS (256)."""
    files = text_corpus(tmp_path / "in", 30)
    files["empty.txt"] = b""
    (tmp_path / "in" / "empty.txt").write_bytes(b"")
    big = "".join(f"ligne {i} é\n" for i in range(400)).encode() + "no newline at the end: ü".encode()
    files["big.txt"] = big
    (tmp_path / "in" / "big.txt").write_bytes(big)
    (tmp_path / "in" / "notes.md").write_bytes(b"not read: the default glob is **/*.txt")
    monkeypatch.setattr(documents_module, "BLOCK", 97)
    meta = run_prepare("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--unit-bytes", "1500", "--holdout-fraction", "0.2")
    out = tmp_path / "out"
    assert len(meta["shards"]) > 10  # big.txt alone spans several units
    for split, held in (("train", False), ("val", True)):
        want = _expected_docs(files, 0.2, held)
        assert want, split
        assert documents(split_ids(out, split), 256) == want, split
        assert meta[split]["documents"] == len(want)
        assert meta[split]["bytes"] == sum(len(d) for d in want)
        assert meta[split]["tokens"] == meta[split]["bytes"] + len(want)
    assert meta["empty_documents"] == 1
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == {"kind": "bytes", "sha256": None,
                                                               "vocab_size": 257, "eos_id": 256}
    for shard in meta["shards"]:
        for split in ("train", "val"):
            if shard[split]["file"]:
                data = (out / shard[split]["file"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == shard[split]["sha256"]
                assert np.frombuffer(data, np.uint16).max() == shard[split]["max_id"]


def test_pieces_of_a_text_file_meet_at_line_starts(tmp_path, monkeypatch):
    """A word-level tokenizer tells a cut inside a word: the pieces (--unit-bytes) and blocks
    (BLOCK) of a file cut after newlines only, so its ids equal the tokenizer's on the whole file."""
    tok = _word_tokenizer(tmp_path / "tok.json", 1000)
    rng = np.random.default_rng(1)
    text = "".join(" ".join(f"w{i}" for i in rng.integers(1, 999, rng.integers(1, 9))) + "\n" for _ in range(300))
    (tmp_path / "a.txt").write_text(text)
    monkeypatch.setattr(documents_module, "BLOCK", 64)
    meta = run_prepare("--input", str(tmp_path / "a.txt"), "--tokenizer", str(tok), "--eos", "</s>",
                       "--output", str(tmp_path / "out"), "--unit-bytes", "500", "--holdout-fraction", "0")
    assert len(meta["shards"]) > 5
    want = load_tokenizer(str(tok), "</s>")._hf.encode(text).ids + [999]
    assert split_ids(tmp_path / "out", "train").tolist() == want


def test_a_line_longer_than_a_block_is_cut_between_characters(tmp_path, monkeypatch):
    """Byte-level BPE loses nothing, so the documents decode to the files exactly, even where
    a block boundary falls inside a line of two- and three-byte characters."""
    files = {"a.txt": ("λé€" * 200 + "\n") * 3, "b.txt": "ascii " * 50 + "ωω€" * 99}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(documents_module, "BLOCK", 100)
    run_prepare("--input", str(tmp_path / "*.txt"), "--output", str(tmp_path / "out"), "--train-tokenizer", "bpe",
                "--vocab-size", "270", "--holdout-fraction", "0")
    tok = load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    decoded = [tok._hf.decode(d) for d in documents(split_ids(tmp_path / "out", "train"), tok.eos_id)]
    assert decoded == [files["a.txt"], files["b.txt"]]


def test_jsonl_with_a_trained_bpe_equals_the_tokenizer_on_each_document(tmp_path):
    docs = [f"record {i}: " + "the quick brown fox " * (i % 7) + "λx." * (i % 3) for i in range(200)]
    docs[17] = ""  # empty: skipped and counted
    lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(docs)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:120]) + "\n\n")  # a blank line is no record
    (tmp_path / "b.jsonl").write_text("\n".join(lines[120:]) + "\n")
    meta = run_prepare("--input", str(tmp_path / "*.jsonl"), "--output", str(tmp_path / "out"),
                       "--train-tokenizer", "bpe", "--vocab-size", "300", "--unit-bytes", "2000")
    tok = load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    assert meta["tokenizer"] == tok.info.to_json() and tok.info.vocab_size == 300
    assert tok.eos_token == "<|endoftext|>" and meta["empty_documents"] == 1
    for split, held in (("train", False), ("val", True)):
        want = [tok._hf.encode(d, add_special_tokens=False).ids for d in docs
                if d and is_held_out(d.encode(), 0.05) == held]
        assert documents(split_ids(tmp_path / "out", split), tok.eos_id) == want, split


def test_parquet_column_in_row_groups_and_a_null_skipped(tmp_path):
    texts = [f"row {i} " + "abc" * (i % 5) for i in range(300)]
    texts[142] = None
    pq.write_table(pa.table({"n": list(range(300)), "body": texts}), tmp_path / "t.parquet", row_group_size=50)
    with pytest.raises(ConfigError, match=r"t.parquet: row 143: column 'body' is null"):  # in a later unit
        run_prepare("--input", str(tmp_path / "t.parquet"), "--field", "body", "--output", str(tmp_path / "o1"),
                    "--unit-bytes", "600")
    meta = run_prepare("--input", str(tmp_path / "t.parquet"), "--field", "body", "--output", str(tmp_path / "out"),
                       "--unit-bytes", "600", "--on-error", "skip", "--holdout-fraction", "0.1")
    assert len(meta["shards"]) > 2 and meta["skipped"] == 1
    for split, held in (("train", False), ("val", True)):
        want = [list(t.encode()) for t in texts if t is not None and is_held_out(t.encode(), 0.1) == held]
        assert documents(split_ids(tmp_path / "out", split), 256) == want, split


def test_bad_json_line_is_named_with_file_and_line_or_skipped(tmp_path):
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(60)]
    lines[44] = '{"text": "unterminated'
    lines[50] = json.dumps({"body": "no text field"})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    # --unit-bytes cuts the file: line 45 lies in a later piece, whose line numbers start further on
    with pytest.raises(ConfigError, match=rf"{path}:45: invalid JSON"):
        run_prepare("--input", str(path), "--output", str(tmp_path / "o1"), "--unit-bytes", "300")
    path.write_text("\n".join(lines[:44] + lines[45:]) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:50: no field 'text' \(fields: body\)"):
        run_prepare("--input", str(path), "--output", str(tmp_path / "o2"), "--unit-bytes", "300")
    path.write_text("\n".join(lines) + "\n")
    meta = run_prepare("--input", str(path), "--output", str(tmp_path / "o3"), "--unit-bytes", "300",
                       "--on-error", "skip")
    assert meta["skipped"] == 2 and meta["train"]["documents"] + meta["val"]["documents"] == 58
    assert [e.split(": ")[0] for e in meta["skipped_examples"]] == [f"{path}:45", f"{path}:51"]


@pytest.mark.parametrize("case, message", [
    ("missing tokenizer", r"tokenizer .*/nope.json does not exist"),
    ("missing column", r"has no column 'text' \(columns: n, body\)"),
    ("unreadable", r"input file /proc/self/mem cannot be read: Input/output error"),
    ("missing input", r"input .*/absent does not exist"),
    ("no match", r"matches no file \(patterns: \*\*/\*.txt"),
])
def test_bad_input_is_a_clear_error(tmp_path, case, message):
    pq.write_table(pa.table({"n": [1], "body": ["x"]}), tmp_path / "t.parquet")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "a.txt").write_text("some text\n")
    args = {"missing tokenizer": ["--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "nope.json")],
            "missing column": ["--input", str(tmp_path / "t.parquet")],
            "unreadable": ["--input", "/proc/self/mem"],
            "missing input": ["--input", str(tmp_path / "absent")],
            "no match": ["--input", str(tmp_path / "empty_dir")]}[case]
    with pytest.raises(ConfigError, match=message):
        run_prepare(*args, "--output", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_output_directory_holding_something_else_is_refused_untouched(tmp_path):
    text_corpus(tmp_path / "a", 5)
    text_corpus(tmp_path / "b", 5, seed=1)
    run_prepare("--input", str(tmp_path / "a"), "--output", str(tmp_path / "out"))
    before = files_state(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"holds another dataset \(input .*/b/doc001.txt is new\)"):
        run_prepare("--input", str(tmp_path / "b"), "--output", str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"holds another dataset \(holdout_fraction is 0.05 there, 0.1 here\)"):
        run_prepare("--input", str(tmp_path / "a"), "--output", str(tmp_path / "out"), "--holdout-fraction", "0.1")
    assert files_state(tmp_path / "out") == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.bin").write_bytes(b"precious")
    with pytest.raises(ConfigError, match=r"not empty \(mine.bin\) and holds no dataset of moe-prepare-data"):
        run_prepare("--input", str(tmp_path / "a"), "--output", str(tmp_path / "other"))
    assert files_state(tmp_path / "other") == {"mine.bin": b"precious"}
    # The same command again finds the dataset finished and rewrites nothing.
    assert run_prepare("--input", str(tmp_path / "a"), "--output", str(tmp_path / "out"))["units_resumed"] == 1
    assert files_state(tmp_path / "out") == before


def test_a_stopped_run_finishes_without_redoing_finished_shards(tmp_path, monkeypatch):
    """Unit 3 dies half-way (a half-written shard under its final name, a temporary file, no
    record): the rerun keeps units 0-2 as they are (same inode, never rewritten), redoes the
    rest, and ends byte for byte like an uninterrupted run."""
    text_corpus(tmp_path / "in", 40)
    argv = ["--input", str(tmp_path / "in"), "--unit-bytes", "3000"]
    run_prepare(*argv, "--output", str(tmp_path / "clean"))
    real = worker.process_unit

    def dies_in_unit_3(job, tok, index, unit, report=None):
        if index == 3:
            (Path(job.out) / "train-00003.bin").write_bytes(b"\x01\x00" * 10)
            (Path(job.out) / "val-00003.bin.tmp-999").write_bytes(b"\x02\x00")
            raise KeyboardInterrupt
        return real(job, tok, index, unit, report)

    monkeypatch.setattr(worker, "process_unit", dies_in_unit_3)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(*argv, "--output", str(tmp_path / "out"))
    out = tmp_path / "out"
    assert not (out / "meta.json").exists() and (out / "shard-00002.json").exists()
    kept = {p.name: p.stat().st_ino for p in out.glob("*-0000[0-2].*")}
    monkeypatch.setattr(worker, "process_unit", real)
    meta = run_prepare(*argv, "--output", str(out))
    assert meta["units_resumed"] == 3 and len(meta["shards"]) > 4
    assert {p.name: p.stat().st_ino for p in out.glob("*-0000[0-2].*")} == kept
    assert files_state(out) == files_state(tmp_path / "clean")


def test_the_output_is_the_same_at_any_worker_count(tmp_path):
    text_corpus(tmp_path / "in", 24)
    argv = ["--input", str(tmp_path / "in"), "--unit-bytes", "2000"]
    run_prepare(*argv, "--output", str(tmp_path / "w0"), "--workers", "0")
    meta = run_prepare(*argv, "--output", str(tmp_path / "w2"), "--workers", "2")  # a pool of 2 processes
    assert len(meta["shards"]) > 2
    assert files_state(tmp_path / "w2") == files_state(tmp_path / "w0")


def _word_tokenizer(path: Path, size: int) -> Path:
    vocab = {f"w{i}": i for i in range(size - 1)} | {"</s>": size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.mark.parametrize("vocab, dtype", [(65_536, "uint16"), (70_000, "uint32")])
def test_ids_are_uint16_when_the_vocabulary_fits_else_uint32(tmp_path, vocab, dtype):
    tok = _word_tokenizer(tmp_path / "tok.json", vocab)
    (tmp_path / "a.txt").write_text(f"w1 w{vocab - 2} w7\n")
    meta = run_prepare("--input", str(tmp_path / "a.txt"), "--tokenizer", str(tok), "--eos", "</s>",
                       "--output", str(tmp_path / "out"), "--holdout-fraction", "0")
    assert meta["dtype"] == dtype and meta["tokenizer"]["eos_id"] == vocab - 1
    assert split_ids(tmp_path / "out", "train").tolist() == [1, vocab - 2, 7, vocab - 1]


def test_an_hf_model_directory_gives_its_tokenizer_and_eos(tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(_word_tokenizer(tmp_path / "tok.json", 50)), eos_token="w9")
    hf.save_pretrained(tmp_path / "model")
    (tmp_path / "a.txt").write_text("w1 w2 w3\n")
    meta = run_prepare("--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "model"),
                       "--output", str(tmp_path / "out"), "--holdout-fraction", "0")
    assert meta["tokenizer"]["eos_id"] == 9  # named by its tokenizer_config.json
    assert split_ids(tmp_path / "out", "train").tolist() == [1, 2, 3, 9]
    assert meta["tokenizer"]["sha256"] == hashlib.sha256((tmp_path / "model" / "tokenizer.json").read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="holds no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_console_script_points_at_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["moe-prepare-data"].partition(":")
    assert (module, name) == ("trainer.data.prepare", "main")


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"host here, pid %d" % os.getpid())
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_job_on_one_output_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capsys,
                                                                                 monkeypatch):
    """While another process holds the output's lock, a job exits 7 naming it and changes
    nothing there (not the plan, not the temporary files of a unit in progress, which a second
    job would otherwise remove); once the holder is killed (it never unlocks), the same
    command finishes the dataset."""
    assert prepare.BUSY_EXIT == exit_codes.RUN_DIR_BUSY
    text_corpus(tmp_path / "in", 5)
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "in"), "--output", str(out), "--workers", "0", "--no-progress"]

    def in_progress(job, tok, index, unit, report=None):
        (Path(job.out) / f"train-{index:05d}.bin.tmp-1").write_bytes(b"being written")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # a job's state half-way through its first unit
        patch.setattr(worker, "process_unit", in_progress)
        with pytest.raises(KeyboardInterrupt):
            prepare.main(argv)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / prepare.LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = files_state(out)
        assert prepare.main(argv) == exit_codes.RUN_DIR_BUSY
        assert f"is being written by another moe-prepare-data (host here, pid {holder.pid})" in capsys.readouterr().err
        assert files_state(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert prepare.main(argv) == 0
    assert (out / "meta.json").is_file() and not list(out.glob("*.tmp-*"))
