"""An HF model directory opened for reading: config.json, the safetensors files (one, or
several with model.safetensors.index.json) read lazily slice by slice, the tokenizer files.

    hf = open_hf_dir(path)          # CheckpointError naming the file at fault
    hf.family, hf.config            # the family (by model_type) and config.json as a dict
    hf.source.read(name, slices)    # only those slices leave the file (safetensors get_slice)
    hf.record()                     # what a checkpoint keeps about where its model came from

Opening reads config.json and each file's header, nothing else: every rank opens the
directory before any collective, and what is wrong with it is the same error everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoint.errors import CheckpointError
from checkpoint.store import sha256_file
from model.errors import ConfigError

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# What a tokenizer consists of in an HF directory; export copies those present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class SafetensorsSource:
    """checkpoint.hf.links.TensorSource over safetensors files: `read` returns only the slices."""

    def __init__(self, handles: dict[str, object], where: dict[str, str]):
        self.handles, self.where = handles, where  # file -> safe_open handle; tensor -> file

    def names(self):
        return self.where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.handles[self.where[name]].get_slice(name)[index]


@dataclass
class HFDir:
    path: Path
    config: dict
    source: SafetensorsSource
    tokenizer_files: list[str] = field(default_factory=list)

    @property
    def family(self):
        from checkpoint.hf import family_of

        try:
            return family_of(self.config)
        except ConfigError as exc:  # the file is at fault, not the run's config
            raise CheckpointError(f"{self.path / CONFIG}: {exc}") from None

    def configs(self):
        """(ModelConfig, MoEConfig) of config.json; a field they cannot represent is refused."""
        try:
            return self.family.config_from_hf(self.config)
        except ConfigError as exc:
            raise CheckpointError(f"{self.path / CONFIG}: {exc}") from None

    @property
    def tokenizer_sha256(self) -> str | None:
        """The identity of the model's tokenizer: sha256 of its tokenizer.json (None without one)."""
        return tokenizer_sha256(self.path)

    def record(self) -> dict:
        """What a checkpoint trained from this directory keeps (its meta's model_source)."""
        return {"hf_dir": str(self.path.resolve()), "model_type": self.config.get("model_type"),
                "tokenizer_files": list(self.tokenizer_files),
                "tokenizer_sha256": self.tokenizer_sha256,
                "token_ids": {k: self.config.get(k) for k in TOKEN_IDS if self.config.get(k) is not None}}


def tokenizer_sha256(path: str | Path) -> str | None:
    """sha256 of DIR/tokenizer.json, the identity prepared datasets record; None without one."""
    file = Path(path) / "tokenizer.json"
    return sha256_file(file) if file.is_file() else None


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def open_hf_dir(path: str | Path) -> HFDir:
    """Open an HF model directory: config.json and every safetensors file's header."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"HF directory {path} does not exist (or is not a directory)")
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} has no {CONFIG}: not an HF model directory")
    config = _read_json(path / CONFIG)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / CONFIG} does not hold a JSON object")
    files, index = _files(path)
    handles, where = {}, {}
    for name in files:
        handles[name] = _open(path / name)
        for tensor in handles[name].keys():
            if tensor in where:
                raise CheckpointError(f"{path}: tensor {tensor} is in both {where[tensor]} and {name}")
            where[tensor] = name
    if index is not None and index != where:
        wrong = sorted(t for t in set(index) | set(where) if index.get(t) != where.get(t))
        raise CheckpointError(
            f"{path / INDEX} does not match the files: " + "; ".join(
                f"{t} is in {where.get(t) or 'no file'}, the index says {index.get(t) or 'nothing'}"
                for t in wrong[:4]) + (f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else ""))
    tokenizer = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    return HFDir(path, config, SafetensorsSource(handles, where), tokenizer)


def _files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read, and the index's tensor -> file map (None without one)."""
    if (path / INDEX).is_file():
        index = _read_json(path / INDEX).get("weight_map")
        if not isinstance(index, dict) or not index:
            raise CheckpointError(f"{path / INDEX} has no weight_map")
        files = sorted(set(index.values()))
        for name in files:
            if not (path / name).is_file():
                named = sorted(t for t, f in index.items() if f == name)
                raise CheckpointError(f"{path / name} is missing: {INDEX} places {len(named)} "
                                      f"tensors there, e.g. {named[0]}")
        return files, index
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors file (weights in other formats are "
                              "not read: save_pretrained writes safetensors)")
    return files, None


def _open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(file, "pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from None


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} cannot be read as JSON: {exc}") from None
