"""Module by module, ours equals transformers' on the same weights (loaded through each
family's name table): attention, MoE block and decoder layer per family, and DeepSeek-V3's
MoE block (sigmoid scores, group-limited top-k, choice-only bias, scaling, shared experts)
against transformers' DeepseekV3MoE, from both expert layouts. Compared: output, the input's
gradient and every parameter's. fp32: errors within 2e-5 of the largest magnitude."""

import pytest
import torch

from checkpoint.hf import DictSource, moe_block_table
from checkpoint.hf.deepseek_v3 import DEEPSEEK_V3, moe_config_from_hf
from model.moe import MoELayer, NativeMoE
from tests.tolerance import close
from tests.unit.hf_tiny import hf_config, ours_from, randomize_, tiny_hf
from tests.unit.test_hf_models import hf_grads

REL = 2e-5


def _compare(ours_fn, hf_fn, ours_model, hf_model, family_cfgs, seed=3):
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(seed))
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    for m in (ours_model, hf_model):
        m.zero_grad()
    got, want = ours_fn(x_ours), hf_fn(x_hf)
    close(got, want, REL, "output")
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed + 1))
    got.backward(g)
    want.backward(g)
    close(x_ours.grad, x_hf.grad, REL, "input gradient")
    grads = hf_grads(ours_model, *family_cfgs)
    compared = 0
    for name, p in hf_model.named_parameters():
        if p.grad is not None:
            close(grads[name], p.grad, REL, f"gradient of {name}")
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_attention_moe_block_and_decoder_layers_equal_transformers(model_type):
    hf_model = tiny_hf(model_type)
    ours, *cfgs = ours_from(hf_model, hf_model.state_dict())
    hf_layers = hf_model.model.layers
    positions = torch.arange(10)[None]
    rotary = hf_model.model.rotary_emb(torch.zeros(1, 10, 32), positions)
    cos, sin = ours.rope_cos, ours.rope_sin
    _compare(lambda x: ours.layers[0].attention(x, cos, sin),
             lambda x: hf_layers[0].self_attn(x, position_embeddings=rotary, attention_mask=None)[0],
             ours, hf_model, cfgs)
    moe_ids = [i for i, b in enumerate(ours.layers) if isinstance(b.ffn, MoELayer)]
    assert moe_ids and all(type(hf_layers[i].mlp).__name__.endswith(("MoeBlock", "SparseMoeBlock"))
                           for i in moe_ids)
    _compare(lambda x: ours.layers[moe_ids[0]].ffn(x)[0], hf_layers[moe_ids[0]].mlp,
             ours, hf_model, cfgs)
    for i in range(len(hf_layers)):  # dense blocks too, where the family has them
        _compare(lambda x: ours.layers[i](x, cos, sin)[0],
                 lambda x: hf_layers[i](x, position_embeddings=rotary, attention_mask=None,
                                        position_ids=positions),
                 ours, hf_model, cfgs)


def _split_experts(fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused experts as per-expert matrices, by hand (the other layout)."""
    out = {k: v for k, v in fused.items() if not k.startswith("experts.")}
    gate_up, down = fused["experts.gate_up_proj"], fused["experts.down_proj"]
    F = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        out[f"experts.{e}.gate_proj.weight"] = gate_up[e, :F]
        out[f"experts.{e}.up_proj.weight"] = gate_up[e, F:]
        out[f"experts.{e}.down_proj.weight"] = down[e]
    return out


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_deepseek_v3_moe_block_equals_transformers(layout):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = hf_config("deepseek_v3")
    torch.manual_seed(0)
    hf_block = DeepseekV3MoE(config)
    randomize_(hf_block)
    moe = moe_config_from_hf(config.to_dict())
    assert (moe.n_group, moe.topk_group, moe.top_k, moe.shared_expert_hidden) == (4, 2, 3, 32)
    ours = NativeMoE(32, moe)
    state = hf_block.state_dict()
    state = state if layout == "fused" else _split_experts(state)
    table = moe_block_table(DEEPSEEK_V3, 32, moe, layout)
    table.check(DictSource(state))
    ours.load_state_dict({n: table.read(DictSource(state), n) for n in table.links})

    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    route = ours.router(x.reshape(-1, 32))
    plain = ours.router.weight.detach() @ x.reshape(-1, 32).T  # unbiased, ungrouped top-3
    assert not torch.equal(route.topk_idx_TK.sort(-1).values, plain.T.topk(3).indices.sort(-1).values)
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = ours(x_ours)[0], hf_block(x_hf)
    close(got, want, REL, "output")
    got.sum().backward()
    want.sum().backward()
    close(x_ours.grad, x_hf.grad, REL, "input gradient")
    grads = {n: p.grad for n, p in ours.named_parameters()} | {"router.expert_bias": ours.router.expert_bias}
    in_memory = moe_block_table(DEEPSEEK_V3, 32, moe, "fused")  # transformers' parameter names
    for name, p in hf_block.named_parameters():
        close(in_memory.export(name, grads.__getitem__), p.grad, REL, f"gradient of {name}")
