"""HuggingFace MoE families: config mappings both ways and one name table per family.

    family = FAMILIES[hf_config["model_type"]]
    model_cfg, moe_cfg = family.config_from_hf(hf_config)      # refuses what we cannot represent
    table = build_table(family, model_cfg, moe_cfg, layout)     # layout: per_expert | fused
    table.check(source)                                         # every HF tensor used, none missing
    block = table.read(source, "layers.3.ffn.experts.w1_EDF", box)   # reads only that block
    hf_tensor = table.export("model.layers.3.mlp.experts.0.gate_proj.weight", ours.__getitem__)

Families: mixtral, qwen2_moe, qwen3_moe, olmoe, and deepseek_v3's MoE block
(`moe_block_table`, `deepseek_v3.moe_config_from_hf`; its attention is not ours).

On top of the tables (docs/hf.md):
    hf_dir.py   an HF directory opened for reading: config.json, safetensors read slice by slice
    start.py    checkpoint.init_from=hf:PATH: configs merged, each rank's blocks filled
    export.py   one of our checkpoints (any layout) written as an HF directory
"""

from __future__ import annotations

from checkpoint.hf.convert import detect_layout, hf_to_ours, ours_to_hf
from checkpoint.hf.deepseek_v3 import DEEPSEEK_V3
from checkpoint.hf.links import DictSource, TensorSource
from checkpoint.hf.mixtral import MIXTRAL
from checkpoint.hf.olmoe import OLMOE
from checkpoint.hf.qwen_moe import QWEN2_MOE, QWEN3_MOE
from checkpoint.hf.table import LAYOUTS, Family, Table, build_table, moe_block_table
from model.errors import ConfigError

FAMILIES = {f.model_type: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V3)}


def family_of(hf_config: dict) -> Family:
    """The family of an HF config.json dict, by its model_type."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"HF model_type {model_type!r} is not supported; supported: "
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "LAYOUTS", "DictSource", "Family", "Table", "TensorSource", "build_table",
           "detect_layout", "family_of", "hf_to_ours", "moe_block_table", "ours_to_hf"]
