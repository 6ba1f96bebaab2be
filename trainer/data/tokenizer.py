"""Tokenizers for prepared datasets: bytes, a tokenizer.json (HF `tokenizers`), an HF model
directory, or a byte-level BPE trained on the corpus; and the identity a dataset records.

No torch here: the preparation workers import this module.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.errors import ConfigError

BYTES = "bytes"
# End-of-document token of a BPE trained here (GPT-2's name for it).
TRAINED_EOS = "<|endoftext|>"
# Tried in order when neither --eos nor the model directory names the EOS token.
EOS_CANDIDATES = (TRAINED_EOS, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerInfo:
    """What identifies a tokenizer: a dataset records it, a run compares it.

    kind: bytes or hf; sha256: of the tokenizer.json file (None for bytes); eos_id: None for
    raw byte corpora, which have no end-of-document token."""

    kind: str
    sha256: str | None
    vocab_size: int
    eos_id: int | None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TokenizerInfo":
        return cls(data["kind"], data.get("sha256"), int(data["vocab_size"]), data.get("eos_id"))

    def describe(self) -> str:
        what = "bytes" if self.kind == BYTES else f"tokenizer.json sha256 {str(self.sha256)[:12]}"
        return f"{what}, vocab {self.vocab_size}, EOS id {self.eos_id}"


# The identity of the raw byte sources (stdlib, text): 256 ids and no end-of-document token.
RAW_BYTES = TokenizerInfo(BYTES, None, 256, None)


class Tokenizer:
    """Encodes documents (str, or bytes as read from a text file) to arrays of ids."""

    def __init__(self, info: TokenizerInfo, path: Path | None = None, hf=None):
        self.info, self.path, self._hf = info, path, hf

    @property
    def eos_id(self) -> int:
        return self.info.eos_id

    @property
    def eos_token(self) -> str | None:
        """The EOS token's text (None for bytes)."""
        return None if self._hf is None else self._hf.id_to_token(self.eos_id)

    def encode_batch(self, docs: list[str | bytes]) -> list[np.ndarray]:
        """One int64 array per document, no special tokens added."""
        if self._hf is None:  # bytes: id = byte value
            return [np.frombuffer(d if isinstance(d, bytes) else d.encode("utf-8"), np.uint8).astype(np.int64)
                    for d in docs]
        texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs]
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]


def file_sha256(path: Path) -> str:
    """checkpoint.store.sha256_file, without its torch import: moe-prepare-data's workers load
    this module, and a worker that imports torch pays seconds of start-up for nothing."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _eos_of_model_dir(directory: Path) -> str | None:
    """The EOS token an HF model directory names (tokenizer_config.json, else config.json)."""
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    return None


def load_tokenizer(spec: str, eos: str | None = None) -> Tokenizer:
    """`bytes`, a tokenizer.json file, or an HF model directory holding one. The EOS token is
    `eos`, else the one the model directory names, else the first of EOS_CANDIDATES present."""
    if spec == BYTES:
        if eos is not None:
            raise ConfigError(f"--eos ({eos!r}) does not apply to the bytes tokenizer (its EOS id is 256)")
        return Tokenizer(TokenizerInfo(BYTES, None, 257, 256))
    path = Path(spec)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise ConfigError(f"tokenizer directory {path} holds no {TOKENIZER_FILE} (an HF model "
                              "directory with a fast tokenizer has one)")
        eos = eos or _eos_of_model_dir(path)
        path = path / TOKENIZER_FILE
    elif not path.is_file():
        raise ConfigError(f"tokenizer {spec} does not exist (give a tokenizer.json, an HF model "
                          f"directory, or {BYTES})")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions
        raise ConfigError(f"tokenizer {path} cannot be read: {exc}") from None
    names = [eos] if eos else [t for t in EOS_CANDIDATES if hf.token_to_id(t) is not None][:1]
    eos_id = hf.token_to_id(names[0]) if names else None
    if eos_id is None:
        raise ConfigError(f"tokenizer {path}: " + (f"EOS token {eos!r} is not in its vocabulary" if eos else
                          f"none of {', '.join(EOS_CANDIDATES)} is in its vocabulary; name the "
                          "end-of-document token with --eos"))
    vocab = hf.get_vocab_size(with_added_tokens=True)
    return Tokenizer(TokenizerInfo("hf", file_sha256(path), vocab, eos_id), path, hf)


def train_bpe(texts: Iterable[str | bytes], vocab_size: int, out: Path) -> Tokenizer:
    """Train a byte-level BPE (HF `tokenizers`' trainer) on `texts`, save it to `out`
    atomically and load it back. Its EOS token is TRAINED_EOS (id 0)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ConfigError(f"--vocab-size ({vocab_size}) must be at least {len(alphabet) + 1}: "
                          "the 256 bytes and the end-of-document token")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[TRAINED_EOS],
                                  initial_alphabet=alphabet, show_progress=False)
    hf.train_from_iterator(_as_text(texts), trainer)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    hf.save(str(tmp))
    os.replace(tmp, out)
    return load_tokenizer(str(out), TRAINED_EOS)


def _as_text(docs: Iterable[str | bytes]) -> Iterator[str]:
    for d in docs:
        yield d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d
