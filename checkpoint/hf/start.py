"""Starting a run from an HF directory: `checkpoint.init_from=hf:PATH`.

    start = start_from_hf(job)                   # prepare(): opens, merges configs, checks; no collectives
    model = TransformerLM(...); tp and ep transforms
    load_hf_weights(start, model, topology)      # each rank reads only the blocks it holds

The architecture comes from config.json: a FROM_FILE field that the YAML or the command line
set (job.explicit) must agree with it, one left out takes the file's value; SUGGESTED fields
(training settings transformers' config carries) take the file's value unless set. Then the
family's table is held against the files: every tensor used, none missing, every shape as the
model needs, before any process group exists, so a bad file is the same error on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from checkpoint.errors import CheckpointError, agree
from checkpoint.hf.convert import detect_layout
from checkpoint.hf.hf_dir import CONFIG, HFDir, open_hf_dir
from checkpoint.hf.table import Table, build_table
from checkpoint.layout import Box, Shard, buffer_shards, shards
from model.config import ARCHITECTURE, ModelConfig, MoEConfig
from model.errors import ConfigError
from model.transformer import TransformerLM

PREFIX = "hf:"
# What config.json decides: the whole decoder, and the MoE layer's shapes and routing.
FROM_FILE = {"model": tuple(f.name for f in dataclasses.fields(ModelConfig)),
             "moe": ARCHITECTURE["moe"] + ("top_k", "renormalize", "score_func", "n_group",
                                           "topk_group", "routed_scaling_factor")}
# Training settings the file carries (transformers' router_aux_loss_coef): defaults only.
SUGGESTED = {"moe": ("aux_loss_coef", "aux_loss_form", "z_loss_coef")}


@dataclass
class HFStart:
    """An HF directory checked against the model it starts: its name table, links by our name."""

    hf: HFDir
    table: Table

    @property
    def path(self) -> Path:
        return self.hf.path


def hf_path(spec: str | None) -> str | None:
    """PATH of an init_from of the form hf:PATH, else None."""
    return spec[len(PREFIX):] if spec and spec.startswith(PREFIX) else None


def start_from_hf(job) -> HFStart | None:
    """For checkpoint.init_from=hf:PATH: open PATH, fill job.model and job.moe from its
    config.json and check its tensors against that model. None for any other init_from."""
    path = hf_path(job.checkpoint.init_from)
    if path is None:
        return None
    hf = open_hf_dir(path)
    merge_config(job, hf)
    return HFStart(hf, checked_table(hf, job.model, job.moe))


def merge_config(job, hf: HFDir) -> None:
    """Set job.model and job.moe from config.json; a value set explicitly that differs is
    refused, naming both."""
    model, moe = hf.configs()
    theirs = {"model": model, "moe": moe}
    for section, names in FROM_FILE.items():
        for name in names:
            value, dotted = getattr(theirs[section], name), f"{section}.{name}"
            ours = getattr(getattr(job, section), name)
            if dotted in job.explicit and ours != value:
                raise CheckpointError(
                    f"{dotted} is {ours!r} here and {value!r} in {hf.path / CONFIG}"
                    f"{_hf_keys(hf, model, moe, section, name, ours)}: leave it out (the file "
                    "decides the architecture) or start from another model")
            setattr(getattr(job, section), name, value)
    for section, names in SUGGESTED.items():
        for name in names:
            if f"{section}.{name}" not in job.explicit:
                setattr(getattr(job, section), name, getattr(theirs[section], name))


def _hf_keys(hf: HFDir, model: ModelConfig, moe: MoEConfig, section: str, name: str, ours) -> str:
    """' (hidden_size 128)': the config.json keys that our field's value decides."""
    family = hf.family
    try:
        mine = {"model": model, "moe": moe}
        mine[section] = dataclasses.replace(mine[section], **{name: ours})
        a, b = family.config_to_hf(model, moe), family.config_to_hf(mine["model"], mine["moe"])
    except ConfigError:  # a value the family cannot express at all: no key to name
        return ""
    keys = [k for k in a if a[k] != b.get(k)]
    return f" ({', '.join(f'{k} {hf.config.get(k, a[k])!r}' for k in keys)})" if keys else ""


def checked_table(hf: HFDir, model: ModelConfig, moe: MoEConfig) -> Table:
    """The family's table for this model, in the files' expert layout, held against the files."""
    try:
        table = build_table(hf.family, model, moe, detect_layout(hf.source.names()))
        table.check(hf.source)
    except ConfigError:
        raise  # the run asks for a feature the family cannot express (e.g. a router bias)
    except ValueError as exc:
        raise CheckpointError(f"{hf.path}: {exc}") from None
    return table


def load_hf_weights(start: HFStart, model: nn.Module, topology=None) -> None:
    """Fill the (already tp/ep-transformed) model's parameters and persistent buffers, each
    rank reading only the blocks it holds. With a topology: collective, every rank raises
    the same CheckpointError if any failed; without one: the whole model, one process."""
    error = None
    try:
        held = shards(model, topology) if topology is not None else [
            Shard(n, p, tuple(p.shape), Box.whole(p.shape), "world") for n, p in model.named_parameters()]
        held += buffer_shards(model)
        names = {s.name for s in held}
        if names != set(start.table.links):  # the model was built from the configs it was checked for
            raise CheckpointError(f"{start.path}: the model's tensors are not the checked ones: "
                                  f"{sorted(names ^ set(start.table.links))[:4]}")
        with torch.no_grad():
            for s in held:  # copied as read: a rank never holds its share twice
                values = start.table.read(start.hf.source, s.name, s.box)
                s.param.copy_(values.to(s.param.device))
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        error = f"{type(exc).__name__}: {exc}"
    what = f"loading the weights of {start.path}"
    if topology is not None:
        agree(error, what)
    elif error:
        raise CheckpointError(f"{what}: {error}")


def load_hf_model(path: str | Path, settings: Callable[[ModelConfig, MoEConfig], dict] | None = None
                  ) -> tuple[TransformerLM, HFDir]:
    """The whole model of an HF directory in this process, and the directory. `settings`
    gives run settings of the MoE layer (backend, expert_impl) for the file's configs."""
    hf = open_hf_dir(path)
    model_cfg, moe_cfg = hf.configs()
    moe_cfg = dataclasses.replace(moe_cfg, **(settings(model_cfg, moe_cfg) if settings else {}))
    start = HFStart(hf, checked_table(hf, model_cfg, moe_cfg))
    model = TransformerLM(model_cfg, moe_cfg)
    load_hf_weights(start, model)
    return model, hf
