"""Small corpora and prepared datasets for the data tests (tests/unit/test_data_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainer.data.prepare import parser, prepare


def run_prepare(*argv: str) -> dict:
    """moe-prepare-data in this process (--workers 0 unless given), no progress bar."""
    workers = [] if any(a.startswith("--workers") for a in argv) else ["--workers", "0"]
    return prepare(parser().parse_args([*argv, *workers, "--no-progress"]))


def split_ids(out: Path, split: str) -> np.ndarray:
    """A split's token ids, its shards concatenated in order."""
    meta = json.loads((Path(out) / "meta.json").read_text())
    arrays = [np.fromfile(Path(out) / s[split]["file"], dtype=meta["dtype"])
              for s in meta["shards"] if s[split]["file"]]
    return np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)


def documents(ids: np.ndarray, eos: int) -> list[list[int]]:
    """The documents of a token stream in which every document is followed by EOS."""
    assert len(ids) == 0 or ids[-1] == eos, "the stream must end with EOS"
    ends = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e].tolist() for s, e in zip(starts, ends)]


def text_corpus(folder: Path, count: int, seed: int = 0, size: int = 600) -> dict[str, bytes]:
    """`count` text files of varied (non-ASCII included) lines, some in a sub-folder."""
    rng = np.random.default_rng(seed)
    words = ["def", "return", "x", "données", "λ", "class", "import", "Ω(n)", "\t", "#"]
    files = {}
    for i in range(count):
        rel = f"sub/doc{i:03d}.txt" if i % 3 == 0 else f"doc{i:03d}.txt"
        lines = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(rng.integers(1, size // 20))]
        files[rel] = ("\n".join(lines) + "\n").encode("utf-8")
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(files[rel])
    return files


def files_state(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under `folder`, by relative name."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def two_datasets(root: Path, files: int, size: int, unit_bytes: int) -> tuple[Path, Path]:
    """Two byte-tokenized datasets of different text, each in several shards, a fifth held out."""
    for name, seed in (("a", 0), ("b", 1)):
        text_corpus(root / f"in_{name}", files, seed=seed, size=size)
        run_prepare("--input", str(root / f"in_{name}"), "--output", str(root / name), "--unit-bytes",
                    str(unit_bytes), "--holdout-fraction", "0.2")
    return root / "a", root / "b"
