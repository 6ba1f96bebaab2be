"""Whole in-memory state dicts, HF <-> ours, on top of the name tables.

Per-rank and lazy reading go through `Table.read` with a `TensorSource` and a block directly;
these two convert everything at once (tests, small models, and the reference the I/O layer
is checked against). The tensors returned may share memory with the ones given.
"""

from __future__ import annotations

import re

import torch

from checkpoint.hf.links import DictSource
from checkpoint.hf.table import FUSED, LAYOUTS, Family, Table, build_table
from model.config import ModelConfig, MoEConfig


def detect_layout(names) -> str:
    """"fused" if the experts are transformers' fused tensors, else "per_expert"."""
    names = list(names)
    fused = any(n.endswith(FUSED) for n in names)
    per_expert = any(re.search(r"\.experts\.\d+\.", n) for n in names)
    if fused and per_expert:
        raise ValueError("HF tensors hold experts in both layouts, fused (experts.gate_up_proj) "
                         "and per expert (experts.{e}....)")
    return LAYOUTS[1] if fused else LAYOUTS[0]


def hf_to_ours(family: Family, hf_state: dict[str, torch.Tensor], model: ModelConfig,
               moe: MoEConfig) -> dict[str, torch.Tensor]:
    """Our state dict (parameters, tied ones once, and persistent buffers) from an HF one.
    Raises naming every HF tensor left unused or missing, or the first misshapen one."""
    source = DictSource(hf_state)
    table = build_table(family, model, moe, detect_layout(source.names()))
    table.check(source)
    return {name: table.read(source, name) for name in table.links}


def ours_to_hf(family: Family, state: dict[str, torch.Tensor], model: ModelConfig,
               moe: MoEConfig, layout: str = "per_expert") -> dict[str, torch.Tensor]:
    """The HF state dict in `layout` from ours (TransformerLM.state_dict() or the output of
    hf_to_ours). Raises naming our tensors left unused or missing, or the first misshapen one."""
    table = build_table(family, model, moe, layout)
    check_ours(table, state, model)
    return {hf: table.export(hf, state.__getitem__) for hf in table.hf_shapes}


def check_ours(table: Table, state: dict[str, torch.Tensor], model: ModelConfig) -> None:
    tied = {"output.weight"} if model.tie_embeddings else set()
    unused = sorted(set(state) - set(table.links) - tied)
    missing = sorted(set(table.links) - set(state))
    if unused or missing:
        raise ValueError("our tensors do not match the model: "
                         + "; ".join(f"{what}: {', '.join(n)}" for what, n in
                                     (("unused", unused), ("missing", missing)) if n))
    for name, link in table.links.items():
        if tuple(state[name].shape) != link.shape:
            raise ValueError(f"our tensor {name} has shape {list(state[name].shape)}, "
                             f"expected {list(link.shape)}")
