"""A family's name table, made concrete for one model: a link for each of our tensors.

A family (checkpoint/hf/mixtral.py, ...) names its tensors relative to a block; `build_table`
walks our model's own tensor names (parameters and persistent buffers of a TransformerLM
built on the meta device from the configs) and makes a link for each from the family's names,
so every parameter has a source or the build fails naming it. `Table.check` then holds a set
of HF tensors against it: every one used, none missing, every shape as expected.

Expert layouts ("per_expert" as save_pretrained writes files; "fused" as transformers' modules
hold them in memory, gate_up_proj (E, 2F, D) and down_proj (E, D, F)) differ only in the
experts' links (and, for Mixtral, the MoE block's prefix).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from checkpoint.hf.links import Direct, FusedPart, Link, PerExpert, TensorSource
from model.config import ModelConfig, MoEConfig
from model.errors import ConfigError
from model.moe import NativeMoE
from model.transformer import TransformerLM

LAYOUTS = ("per_expert", "fused")
ROPE = "rope"  # a table entry's mark: rows permuted within each head (checkpoint/hf/links.py)

# Ours -> HF outside the blocks, and inside every block but its MoE layer ("{i}" is the block).
TOP = {"tok_embeddings.weight": "model.embed_tokens.weight",
       "norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
DECODER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": ("self_attn.q_proj.weight", ROPE),
    "attention.wq.bias": ("self_attn.q_proj.bias", ROPE),
    "attention.wk.weight": ("self_attn.k_proj.weight", ROPE),
    "attention.wk.bias": ("self_attn.k_proj.bias", ROPE),
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": ("self_attn.q_norm.weight", ROPE),
    "attention.k_norm.weight": ("self_attn.k_norm.weight", ROPE),
    "ffn.w1.weight": "mlp.gate_proj.weight",  # a dense block's SwiGLU
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
FUSED = ("experts.gate_up_proj", "experts.down_proj")  # transformers' modules, every family
EXPERTS = ("experts.w1_EDF", "experts.w3_EDF", "experts.w2_EFD")


@dataclass(frozen=True)
class Family:
    """One HF model family: its config mapping both ways and its name table."""

    model_type: str
    architecture: str
    moe_block: dict
    """Ours under `layers.{i}.ffn.` -> HF under `model.layers.{i}.{moe prefix}.`, experts aside."""
    per_expert: tuple[str, str, str]
    """The gate, up and down HF matrix of expert {e}, under the MoE prefix."""
    config_from_hf: Callable[[dict], tuple[ModelConfig, MoEConfig]]
    config_to_hf: Callable[[ModelConfig, MoEConfig], dict]
    moe_prefix: dict = dataclasses.field(default_factory=lambda: {"per_expert": "mlp", "fused": "mlp"})


@dataclass
class Table:
    """Links by our tensor name, and HF tensor name -> the links that write it."""

    links: dict[str, Link]
    hf_shapes: dict[str, tuple[int, ...]]
    writers: dict[str, list[Link]]
    aliases: frozenset[str]
    """HF names allowed in a source but not read (lm_head.weight under tied embeddings)."""

    def check(self, source: TensorSource) -> None:
        """Every HF tensor of `source` is used and of the expected shape, none is missing."""
        names = set(source.names())
        unused = sorted(names - set(self.hf_shapes) - self.aliases)
        missing = sorted(set(self.hf_shapes) - names)
        if unused or missing:
            raise ValueError("HF tensors do not match the model: "
                             + "; ".join(f"{what} ({len(n)}): {', '.join(n[:8])}"
                                         + (" ..." if len(n) > 8 else "")
                                         for what, n in (("unused", unused), ("missing", missing)) if n))
        for name, want in self.hf_shapes.items():
            got = tuple(source.shape(name))
            if got != want:
                raise ValueError(f"HF tensor {name} has shape {list(got)}, expected {list(want)}")

    def read(self, source: TensorSource, ours: str, box=None) -> torch.Tensor:
        """Our tensor `ours` (or its block `box`) from the HF tensors, reading only what it needs."""
        if ours not in self.links:
            raise KeyError(f"{ours} is not a tensor of this model")
        return self.links[ours].read(source, box).contiguous()

    def export(self, hf_name: str, get_ours: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """HF tensor `hf_name` from our whole tensors (`get_ours(name)`), one at a time."""
        if hf_name not in self.writers:
            raise KeyError(f"{hf_name} is not an HF tensor of this model")
        links = self.writers[hf_name]
        first = get_ours(links[0].ours)
        out = torch.empty(self.hf_shapes[hf_name], dtype=first.dtype)
        for link in links:
            link.write(hf_name, first if link is links[0] else get_ours(link.ours), out)
        return out


def our_shapes(model: ModelConfig, moe: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter (tied ones once) and persistent buffer of the model, global shapes."""
    with torch.device("meta"):
        lm = TransformerLM(model, dataclasses.replace(moe, backend="native", expert_impl="loop"))
    persistent = set(lm.state_dict(keep_vars=True))
    shapes = {n: tuple(p.shape) for n, p in lm.named_parameters()}
    shapes |= {n: tuple(b.shape) for n, b in lm.named_buffers() if n in persistent}
    return shapes


def build_table(family: Family, model: ModelConfig, moe: MoEConfig, layout: str) -> Table:
    """The links of a whole TransformerLM of these configs to `family`'s HF names."""
    _check_layout(layout)
    links = {name: _link(family, layout, name, shape, model)
             for name, shape in our_shapes(model, moe).items()}
    aliases = frozenset({TOP["output.weight"]} if model.tie_embeddings else ())
    return _assemble(family, links, aliases)


def moe_block_table(family: Family, dim: int, moe: MoEConfig, layout: str) -> Table:
    """The links of one MoE layer (our names under `ffn.`, e.g. router.weight) to the HF
    names under the family's MoE block (gate.weight, ...): for a block on its own."""
    _check_layout(layout)
    with torch.device("meta"):
        layer = NativeMoE(dim, dataclasses.replace(moe, backend="native", expert_impl="loop"))
    links = {}
    for name, tensor in layer.state_dict(keep_vars=True).items():
        links[name] = _moe_link(family, layout, name, name, tuple(tensor.shape), "")
        if links[name] is None:
            raise ConfigError(f"{family.model_type} has no tensor for our MoE layer's {name}")
    return _assemble(family, links, frozenset())


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"expert layout {layout!r} must be one of {', '.join(LAYOUTS)}")


def _assemble(family: Family, links: dict[str, Link], aliases: frozenset[str]) -> Table:
    hf_shapes, writers, filled = {}, {}, {}
    for link in links.values():
        for hf, shape in link.hf_shapes.items():
            hf_shapes[hf] = shape
            writers.setdefault(hf, []).append(link)
            filled[hf] = filled.get(hf, 0) + math.prod(link.shape) // len(link.hf_shapes)
    for hf, n in filled.items():  # a table whose parts do not tile a tensor is a bug in it
        if n != math.prod(hf_shapes[hf]):
            raise RuntimeError(f"{family.model_type} table fills {n} of the "
                               f"{math.prod(hf_shapes[hf])} elements of {hf}")
    return Table(links, hf_shapes, writers, aliases)


def _link(family: Family, layout: str, name: str, shape, model: ModelConfig) -> Link:
    if name in TOP:
        return Direct(name, TOP[name], shape)
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match:
        hf_layer, rest = f"model.layers.{match.group(1)}.", match.group(2)
        if rest in DECODER:
            hf, mark = (DECODER[rest], None) if isinstance(DECODER[rest], str) else DECODER[rest]
            return Direct(name, hf_layer + hf, shape, model.head_size if mark == ROPE else None)
        if rest.startswith("ffn."):
            prefix = f"{hf_layer}{family.moe_prefix[layout]}."
            link = _moe_link(family, layout, name, rest.removeprefix("ffn."), shape, prefix)
            if link is not None:
                return link
    raise ConfigError(f"{family.model_type} has no tensor for our {name}: the model uses a "
                      "feature this family cannot express")


def _moe_link(family: Family, layout: str, ours: str, within: str, shape, prefix: str) -> Link | None:
    """The link of our MoE-layer tensor `within` (router.weight, experts.w1_EDF, ...)."""
    if within in EXPERTS:
        which = EXPERTS.index(within)  # 0 gate (w1), 1 up (w3), 2 down (w2)
        if layout == "per_expert":
            return PerExpert(ours, prefix + family.per_expert[which], shape)
        E, A, B = shape
        if which == 2:  # down_proj (E, D, F) holds w2_EFD (E, F, D) transposed
            return FusedPart(ours, prefix + FUSED[1], shape, (E, B, A), 0)
        # gate_up_proj (E, 2F, D): gate rows [0, F), up rows [F, 2F)
        return FusedPart(ours, prefix + FUSED[0], shape, (E, 2 * B, A), which * B)
    if within in family.moe_block:
        return Direct(ours, prefix + family.moe_block[within], shape)
    return None
