"""The name tables and config mappings: round trips are bitwise, every block of every tensor
is read from only the HF slices it needs, and bad input raises naming what is wrong."""

import dataclasses
import math

import pytest
import torch

from checkpoint.hf import FAMILIES, DictSource, build_table, detect_layout, hf_to_ours, ours_to_hf
from checkpoint.hf.deepseek_v3 import moe_config_from_hf
from model.errors import ConfigError
from checkpoint.layout import Box
from tests.unit.hf_tiny import hf_config, per_expert_state, tiny_hf

FAMILY_NAMES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def hf(request, tmp_path_factory):
    """(transformers model, its in-memory (fused) state, what save_pretrained wrote (per
    expert), the directory it wrote to)."""
    model, path = tiny_hf(request.param), tmp_path_factory.mktemp(request.param)
    return model, model.state_dict(), per_expert_state(model, path), path


def _cfgs(model):
    config = model.config.to_dict()
    return (FAMILIES[config["model_type"]], *FAMILIES[config["model_type"]].config_from_hf(config))


def test_round_trips_are_bitwise_in_both_layouts(hf):
    model, fused, per_expert, _ = hf
    family, model_cfg, moe_cfg = _cfgs(model)
    assert detect_layout(fused) == "fused" and detect_layout(per_expert) == "per_expert"
    ours = hf_to_ours(family, per_expert, model_cfg, moe_cfg)
    assert all(torch.equal(ours[n], t) for n, t in hf_to_ours(family, fused, model_cfg, moe_cfg).items())
    for layout, state in (("per_expert", per_expert), ("fused", fused)):
        back = ours_to_hf(family, ours, model_cfg, moe_cfg, layout)
        assert back.keys() == state.keys()
        for name, t in state.items():
            assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    # The config too: ours -> config.json -> ours, and transformers builds the same tensors.
    config = family.config_to_hf(model_cfg, moe_cfg)
    assert family.config_from_hf(config) == (model_cfg, moe_cfg)
    rebuilt = type(model)(type(model.config)(**config)).state_dict()
    assert {n: t.shape for n, t in rebuilt.items()} == {n: t.shape for n, t in fused.items()}


class RecordingSource(DictSource):
    """Counts the elements every read returns."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.elements = 0

    def read(self, name, index):
        out = super().read(name, index)
        self.elements += out.numel()
        return out


def _boxes(shape, head_dim):
    """Blocks a rank may hold: halves and quarters along each dim (an ep rank's experts, a tp
    rank's rows or columns), and one odd block inside."""
    for dim, n in enumerate(shape):
        for parts in (2, 4):
            if n % parts == 0:
                size = n // parts
                for k in (0, parts - 1):
                    yield Box(tuple(k * size if d == dim else 0 for d in range(len(shape))),
                              tuple(size if d == dim else m for d, m in enumerate(shape)))
    yield Box(tuple(min(1, n - 1) for n in shape), tuple(max(1, n - 2) for n in shape))


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_every_block_reads_only_what_it_needs(hf, layout):
    """table.read of a block equals that block of the whole conversion and reads no more
    elements than it holds, except rows relabelled for rotary, which may read the rest of
    the heads they touch (never more than one head beyond each end)."""
    model, fused, per_expert, _ = hf
    family, model_cfg, moe_cfg = _cfgs(model)
    state = per_expert if layout == "per_expert" else fused
    table = build_table(family, model_cfg, moe_cfg, layout)
    whole = hf_to_ours(family, state, model_cfg, moe_cfg)
    source = RecordingSource(state)
    for name, link in table.links.items():
        for box in _boxes(link.shape, model_cfg.head_size):
            source.elements = 0
            got = table.read(source, name, box)
            assert torch.equal(got, whole[name][box.slices_within(Box.whole(link.shape))]), (name, box)
            budget = box.numel
            if getattr(link, "perm", None) is not None:
                budget = math.prod(box.sizes[1:]) * (box.sizes[0] + 2 * model_cfg.head_size)
            assert source.elements <= budget, (name, box, source.elements, box.numel)


class SafetensorsSource:
    """The source interface over safetensors' lazy reader: nothing is read but the slices."""

    def __init__(self, handle):
        self.handle = handle

    def names(self):
        return self.handle.keys()

    def shape(self, name):
        return tuple(self.handle.get_slice(name).get_shape())

    def read(self, name, index):
        return self.handle.get_slice(name)[index]


def test_a_safetensors_file_backs_the_source(hf):
    """Reading blocks straight from the file save_pretrained wrote gives the same tensors."""
    from safetensors import safe_open

    model, _, per_expert, path = hf
    family, model_cfg, moe_cfg = _cfgs(model)
    table = build_table(family, model_cfg, moe_cfg, "per_expert")
    whole = hf_to_ours(family, per_expert, model_cfg, moe_cfg)
    with safe_open(path / "model.safetensors", "pt") as handle:
        source = SafetensorsSource(handle)
        table.check(source)
        for name, link in table.links.items():
            box = next(_boxes(link.shape, model_cfg.head_size))
            want = whole[name][box.slices_within(Box.whole(link.shape))]
            assert torch.equal(table.read(source, name, box), want), name


def test_tied_embeddings():
    """tie_word_embeddings: one tensor, embed_tokens; transformers' lm_head.weight (the same
    tensor in memory) is accepted unread, and files carry only embed_tokens."""
    import transformers as tf

    config = hf_config("qwen3_moe")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    family, model_cfg, moe_cfg = _cfgs(model)
    assert model_cfg.tie_embeddings
    ours = hf_to_ours(family, model.state_dict(), model_cfg, moe_cfg)
    assert "output.weight" not in ours
    back = ours_to_hf(family, ours, model_cfg, moe_cfg, "fused")
    assert set(model.state_dict()) - set(back) == {"lm_head.weight"}
    assert all(torch.equal(back[n], model.state_dict()[n]) for n in back)


def test_bad_tensors_are_named(hf):
    model, fused, per_expert, _ = hf
    family, model_cfg, moe_cfg = _cfgs(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=rf"HF tensor {name} has shape \[\d+, 31\], expected \[\d+, 32\]"):
        hf_to_ours(family, per_expert | {name: per_expert[name][:, :31]}, model_cfg, moe_cfg)
    with pytest.raises(ValueError, match=r"unused \(1\): model.layers.0.mlp.extra.weight$"):
        hf_to_ours(family, per_expert | {"model.layers.0.mlp.extra.weight": torch.zeros(1)},
                   model_cfg, moe_cfg)
    expert = next(n for n in per_expert if ".experts.3." in n)
    with pytest.raises(ValueError, match=rf"missing \(1\): {expert}$"):
        hf_to_ours(family, {n: t for n, t in per_expert.items() if n != expert}, model_cfg, moe_cfg)
    with pytest.raises(ValueError, match="experts in both layouts"):
        hf_to_ours(family, per_expert | {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(1)},
                   model_cfg, moe_cfg)
    ours = hf_to_ours(family, fused, model_cfg, moe_cfg)
    with pytest.raises(ValueError, match=r"our tensor norm.weight has shape \[31\], expected \[32\]"):
        ours_to_hf(family, ours | {"norm.weight": ours["norm.weight"][:31]}, model_cfg, moe_cfg)
    with pytest.raises(ValueError, match=r"missing: layers.1.ffn_norm.weight$"):
        ours_to_hf(family, {n: t for n, t in ours.items() if n != "layers.1.ffn_norm.weight"},
                   model_cfg, moe_cfg)


UNSUPPORTED = [  # (model_type, config change, the error)
    ("mixtral", {"sliding_window": 4096}, r"mixtral sliding_window=4096 cannot be represented"),
    ("mixtral", {"router_jitter_noise": 0.1}, r"mixtral router_jitter_noise=0.1 cannot be represented"),
    ("mixtral", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"mixtral rope_parameters=\{'rope_type': 'yarn'.* only the default rotary embedding"),
    ("mixtral", {"rope_scaling": {"type": "linear", "factor": 2.0}}, r"mixtral rope_scaling=.*linear"),
    ("mixtral", {"hidden_act": "gelu"}, r"mixtral hidden_act='gelu' cannot be represented"),
    ("mixtral", {"quantization_config": {"quant_method": "fp8"}},
     r"config fields the model cannot represent: quantization_config=\{'quant_method': 'fp8'\}"),
    ("qwen2_moe", {"use_sliding_window": True}, r"qwen2_moe use_sliding_window=True cannot be"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, r"shared_expert_intermediate_size=0"),
    ("qwen3_moe", {"attention_bias": True}, r"qwen3_moe attention_bias=True cannot be represented"),
    ("qwen3_moe", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]},
     r"layer_types=.*sliding_attention"),
    ("olmoe", {"clip_qkv": 8.0}, r"olmoe clip_qkv=8.0 cannot be represented"),
    ("olmoe", {"model_type": "llama"}, r"model_type is 'llama', not 'olmoe'"),
    ("deepseek_v3", {}, r"multi-head latent attention \(kv_lora_rank=512"),
]


@pytest.mark.parametrize("model_type, change, error", UNSUPPORTED,
                         ids=[f"{m}-{next(iter(c), 'mla')}" for m, c, _ in UNSUPPORTED])
def test_unsupported_config_fields_are_refused_by_name_and_value(model_type, change, error):
    config = hf_config(model_type).to_dict() | change
    with pytest.raises(ConfigError, match=error):
        FAMILIES[model_type].config_from_hf(config)


def test_export_refuses_what_the_family_cannot_express():
    family = FAMILIES["qwen3_moe"]
    model_cfg, moe_cfg = family.config_from_hf(hf_config("qwen3_moe").to_dict())
    with pytest.raises(ConfigError, match=r"qwen3_moe cannot express moe.shared_expert_hidden \(24"):
        family.config_to_hf(model_cfg, dataclasses.replace(moe_cfg, shared_expert_hidden=24))
    with pytest.raises(ConfigError, match=r"mixtral cannot express .*model.qk_norm \('head'"):
        FAMILIES["mixtral"].config_to_hf(model_cfg, moe_cfg)
    with pytest.raises(ConfigError, match=r"qwen3_moe has no tensor for our layers.1.ffn.shared.w1.weight"):
        build_table(family, model_cfg, dataclasses.replace(moe_cfg, shared_expert_hidden=24), "fused")


def test_deepseek_v3_moe_config():
    moe = moe_config_from_hf(hf_config("deepseek_v3").to_dict())
    assert (moe.score_func, moe.expert_bias, moe.n_group, moe.topk_group, moe.routed_scaling_factor,
            moe.renormalize, moe.shared_expert_hidden, moe.first_k_dense) == (
        "sigmoid", True, 4, 2, 2.5, True, 32, 3)
