"""Our checkpoints -> an HF directory that transformers' `from_pretrained` loads: config.json,
safetensors shards of at most max_shard_bytes with their index, the tokenizer files.

    export_checkpoint(ckpt, out)                 # moe-export; checkpoint.export_hf at the end of a run

A checkpoint of any layout (ZeRO partitions included) is read one of our tensors at a time,
each assembled from the pieces that hold it, and each HF tensor is written from it through the
family's table; a shard's tensors are held until that file is written. Everything goes into
OUT.partial, renamed to OUT at the end: OUT is complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint.errors import CheckpointError, StorageError, write_failure
from checkpoint.hf import FAMILIES
from checkpoint.hf.hf_dir import CONFIG, INDEX, SINGLE, TOKENIZER_FILES, tokenizer_sha256
from checkpoint.hf.table import Family, Table, build_table
from checkpoint.reader import Checkpoint, resolve
from checkpoint.store import MANIFEST
from model.config import ModelConfig, MoEConfig
from model.errors import ConfigError

DEFAULT_SHARD_BYTES = 5 * 10**9
EXPORTABLE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # tried in this order


def choose_family(model: ModelConfig, moe: MoEConfig, name: str | None = None) -> Family:
    """Family `name`, or the first of EXPORTABLE that can express the model; refuses naming
    what each family cannot express."""
    names = [name] if name else list(EXPORTABLE)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ConfigError(f"HF family {unknown[0]!r} is not one of {', '.join(FAMILIES)}")
    reasons = []
    for n in names:
        try:
            FAMILIES[n].config_to_hf(model, moe)
            build_table(FAMILIES[n], model, moe, "per_expert")
            return FAMILIES[n]
        except ConfigError as exc:
            reasons.append(str(exc))
    raise ConfigError("the model cannot be exported: " + "; ".join(reasons))


def configs_of(ckpt: Checkpoint) -> tuple[ModelConfig, MoEConfig]:
    """The model and MoE configs a checkpoint was saved with."""
    saved = ckpt.meta.get("config") or {}
    out = []
    for cls, section in ((ModelConfig, "model"), (MoEConfig, "moe")):
        values = saved.get(section)
        if not isinstance(values, dict):
            raise CheckpointError(f"checkpoint {ckpt.path} records no {section} config")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"checkpoint {ckpt.path}: {section} fields this code does not "
                                  f"know: {', '.join(unknown)}")
        out.append(cls(**values))
    return out[0], out[1]


def export_checkpoint(ckpt: Checkpoint, out: str | Path, family: str | None = None,
                      layout: str = "per_expert", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      dtype: torch.dtype | None = None, tokenizer: str | Path | None = None,
                      with_tokenizer: bool = True, progress: bool = True) -> Path:
    """Write the model of `ckpt` as an HF directory `out` (absent or empty). The family is
    `family`, else the one the run started from, else the first that can express the model;
    the tokenizer files come from `tokenizer` (a directory), else from the HF directory the
    run started from (refused if they changed since), unless not `with_tokenizer`."""
    model_cfg, moe_cfg = configs_of(ckpt)
    source = ckpt.meta.get("model_source") or {}
    fam = choose_family(model_cfg, moe_cfg, family or source.get("model_type"))
    table = build_table(fam, model_cfg, moe_cfg, layout)
    keys = _stored_keys(ckpt, table)
    dtype = dtype or getattr(torch, ckpt.tensors[keys["tok_embeddings.weight"]]["dtype"])
    config = fam.config_to_hf(model_cfg, moe_cfg) | source.get("token_ids", {}) | {
        "dtype": str(dtype).removeprefix("torch.")}
    files = _tokenizer_files(source, tokenizer) if with_tokenizer else []
    return write_hf_dir(out, config, table, lambda name: ckpt.full(keys[name]), dtype,
                        max_shard_bytes, files, progress)


def _stored_keys(ckpt: Checkpoint, table: Table) -> dict[str, str]:
    """Our tensor name -> its checkpoint key (model/ or buffer/), checked against the table."""
    stored = {n.split("/", 1)[1]: n for n in ckpt.tensors if n.startswith(("model/", "buffer/"))}
    missing = sorted(set(table.links) - set(stored))
    unused = sorted(set(stored) - set(table.links))
    if missing or unused:
        raise CheckpointError(f"checkpoint {ckpt.path} does not hold the model its config "
                              f"describes: missing {missing[:4]}, not exported {unused[:4]}")
    for name, link in table.links.items():
        shape = tuple(ckpt.tensors[stored[name]]["shape"])
        if shape != link.shape:
            raise CheckpointError(f"checkpoint {ckpt.path}: {name} has shape {list(shape)}, "
                                  f"its config says {list(link.shape)}")
    return {name: stored[name] for name in table.links}


def _tokenizer_files(source: dict, tokenizer: str | Path | None) -> list[Path]:
    if tokenizer is not None:
        folder = Path(tokenizer)
        files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
        if not files:
            raise ConfigError(f"tokenizer directory {folder} holds none of {', '.join(TOKENIZER_FILES)}")
        return files
    names = source.get("tokenizer_files") or []
    if not names:
        return []
    folder = Path(source["hf_dir"])
    unchanged = all((folder / n).is_file() for n in names) and (
        tokenizer_sha256(folder) == source.get("tokenizer_sha256"))
    if not unchanged:
        raise CheckpointError(
            f"the run started from {folder}, whose tokenizer files ({', '.join(names)}) are gone "
            "or changed since: name a directory holding the run's tokenizer (moe-export "
            "--tokenizer DIR), or export without one (--no-tokenizer)")
    return [folder / n for n in names]


def shard_plan(table: Table, dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """HF tensor names in files of at most max_shard_bytes (a larger tensor alone in one), in
    the order of our tensors, so each of ours is read once (see write_hf_dir)."""
    order = list(dict.fromkeys(hf for link in table.links.values() for hf in link.hf_shapes))
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan, size = [[]], 0
    for name in order:
        n = itemsize * math.prod(table.hf_shapes[name])
        if plan[-1] and size + n > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += n
    return plan


def write_hf_dir(out: str | Path, config: dict, table: Table, fetch: Callable[[str], torch.Tensor],
                 dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 tokenizer_files: list[Path] = (), progress: bool = True) -> Path:
    """Write HF directory `out` (absent or empty): the HF tensors of `table` made from our
    whole tensors `fetch(name)`, cast to `dtype`; config.json; copies of `tokenizer_files`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export directory {out} exists and is not empty")
    staging = out.with_name(out.name + ".partial")
    plan = shard_plan(table, dtype, max_shard_bytes)
    files = [SINGLE] if len(plan) == 1 else [
        f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    recent = _Recent(fetch, 2)  # a fused gate_up_proj needs two of ours at once
    bar = tqdm(total=len(table.hf_shapes), unit="tensor", desc=f"export {out.name}", disable=not progress)
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        weight_map, total = {}, 0
        for file, names in zip(files, plan):
            tensors = {}
            for name in names:
                tensors[name] = table.export(name, recent.get).to(dtype).contiguous()
                total += tensors[name].numel() * tensors[name].element_size()
                bar.update(1)
            _save(tensors, staging / file)
            weight_map |= dict.fromkeys(names, file)
        if len(files) > 1:
            (staging / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in tokenizer_files:
            shutil.copyfile(f, staging / Path(f).name)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)  # OUT stays absent: nothing half-written
        if isinstance(exc, OSError):
            raise StorageError(write_failure(staging, exc)) from None
        raise
    finally:
        bar.close()
    return out


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


class _Recent:
    """fetch(name), remembering the last `size` results: HF tensors are written in the order
    of ours, so each of ours is fetched once."""

    def __init__(self, fetch: Callable[[str], torch.Tensor], size: int):
        self.fetch, self.size, self.kept = fetch, size, OrderedDict()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.kept:
            self.kept[name] = self.fetch(name)
            while len(self.kept) > self.size:
                self.kept.popitem(last=False)
        return self.kept[name]



def open_run_checkpoint(spec: str | Path) -> Checkpoint:
    """A checkpoint directory, a run's checkpoints folder (its latest), or a run directory."""
    path = Path(spec)
    if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
        path = path / "checkpoints"
    ckpt, _ = resolve(str(path), path)
    return ckpt
