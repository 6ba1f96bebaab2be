"""The model features HF families need, on one process, against plain definitions: grouped
key/value heads, the KV cache, dense-block patterns, the pooled load-balancing loss, the
parameter count, initialisation, and recompute / compile with all of them on. (Equality with
transformers itself: tests/unit/test_hf_*.py.)"""

import copy
import dataclasses

import pytest
import torch

from model.config import ModelConfig, MoEConfig
from model.flops import model_cost
from model.kv_cache import KVCache, greedy_generate
from model.moe import MoELayer
from model.transformer import TransformerLM

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, ffn_hidden=48, max_seq_len=24)
MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=16)
# Everything at once: GQA, a head size unrelated to dim / n_heads, q/k/v biases, QK-norm,
# sigmoid grouped routing with a choice bias and scaling, a gated shared expert, a dense block.
RICH = dataclasses.replace(CFG, n_kv_heads=2, head_dim=12, qkv_bias=True, qk_norm="proj")
RICH_MOE = MoEConfig(num_experts=8, top_k=2, expert_hidden=16, score_func="sigmoid", n_group=4,
                     topk_group=2, expert_bias=True, routed_scaling_factor=2.0,
                     shared_expert_hidden=24, shared_expert_gate=True, first_k_dense=1,
                     aux_loss_form="pooled")


def _rich(seed=0, qk_norm="proj") -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(dataclasses.replace(RICH, qk_norm=qk_norm), RICH_MOE)
    with torch.no_grad():  # non-trivial gains, biases and expert bias
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dim() == 1 and t.is_floating_point() and "rope" not in name:
                t.add_(torch.randn(t.shape) * 0.1)
    return model


def test_grouped_query_attention_equals_multi_head_with_each_kv_head_repeated():
    """Query head h reads key/value head h // (n_heads / n_kv_heads), as transformers'
    repeat_kv: the same model with every kv head's rows copied to its query heads."""
    torch.manual_seed(0)
    gqa = TransformerLM(dataclasses.replace(CFG, n_kv_heads=2), MOE)
    mha = TransformerLM(CFG, MOE)
    state = gqa.state_dict()
    for i in range(CFG.n_layers):
        for w in ("wk", "wv"):
            rows = state[f"layers.{i}.attention.{w}.weight"].unflatten(0, (2, 8))  # (G, Dh, D)
            state[f"layers.{i}.attention.{w}.weight"] = rows.repeat_interleave(2, 0).flatten(0, 1)
    mha.load_state_dict(state)
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qk_norm", ["head", "proj"])
def test_decoding_with_the_kv_cache_equals_the_full_forward(qk_norm):
    """Prefill 5 tokens, then 3 at once (a shifted causal mask), then one at a time: the
    logits of every position equal one forward over the whole sequence."""
    model = _rich(qk_norm=qk_norm)
    x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(x).logits
    cache = KVCache(model, batch=2, max_len=20)
    pieces = [model(x[:, :5], cache=cache, start=0).logits, model(x[:, 5:8], cache=cache, start=5).logits]
    pieces += [model(x[:, i : i + 1], cache=cache, start=i).logits for i in range(8, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"positions \[20, 21\) exceed the cache's 20"):
        model(x[:, :1], cache=cache, start=20)


def test_greedy_generation_equals_argmax_of_full_forwards():
    model = _rich()
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(2))
    tokens = prompt
    for _ in range(10):  # no cache: the whole sequence each time
        tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy_generate(model, prompt, 10), tokens)


@pytest.mark.parametrize("fields, pattern", [
    (dict(), [1, 1, 1, 1, 1, 1]),
    (dict(every_n_layers=2), [0, 1, 0, 1, 0, 1]),
    (dict(first_k_dense=2), [0, 0, 1, 1, 1, 1]),  # DeepSeek-V3's first_k_dense_replace
    (dict(dense_layers=[0, 3]), [0, 1, 1, 0, 1, 1]),  # Qwen-MoE's mlp_only_layers
    (dict(every_n_layers=2, first_k_dense=2, dense_layers=[5]), [0, 0, 0, 1, 0, 0]),
])
def test_dense_block_patterns(fields, pattern):
    model = TransformerLM(dataclasses.replace(CFG, n_layers=6), dataclasses.replace(MOE, **fields))
    assert [int(isinstance(b.ffn, MoELayer)) for b in model.layers] == pattern


def test_pooled_load_balancing_loss():
    """moe.aux_loss_form pooled: E * sum_e f_e P_e with f_e (choices of e per token) and P_e
    (mean probability) each averaged over the MoE layers; = top_k x per_layer for one layer."""
    torch.manual_seed(0)
    moe = dataclasses.replace(MOE, aux_loss_form="pooled")
    pooled = TransformerLM(CFG, moe)
    per_layer = TransformerLM(CFG, MOE)
    per_layer.load_state_dict(pooled.state_dict())
    x = torch.randint(0, 64, (2, 16))
    out = pooled(x, x)
    T, L = x.numel(), CFG.n_layers
    with torch.no_grad():
        h, counts, probs = pooled.tok_embeddings(x), torch.zeros(4), torch.zeros(4)
        for block in pooled.layers:
            normed = block.ffn_norm(h + block.attention(block.attention_norm(h), pooled.rope_cos, pooled.rope_sin))
            logits = normed.reshape(T, -1) @ block.ffn.router.weight.T
            counts += torch.zeros(4).scatter_add_(0, logits.topk(2).indices.flatten(), torch.ones(2 * T))
            probs += logits.softmax(-1).sum(0)
            h = block(h, pooled.rope_cos, pooled.rope_sin)[0]
    torch.testing.assert_close(out.aux_loss, 4 * (counts / (L * T) * probs / (L * T)).sum())
    torch.testing.assert_close(out.loss, out.lm_loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.z_loss)
    one = dataclasses.replace(CFG, n_layers=1)
    a, b = TransformerLM(one, moe), TransformerLM(one, MOE)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x).aux_loss, 2 * b(x).aux_loss)


@pytest.mark.parametrize("qk_norm", ["none", "head", "proj"])
def test_parameter_count_and_initialisation(qk_norm):
    model = _rich(qk_norm=qk_norm)
    cfg = dataclasses.replace(RICH, qk_norm=qk_norm)
    assert model_cost(cfg, RICH_MOE, 16).total_params == sum(p.numel() for p in model.parameters())
    model.reset_parameters()
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (4 * 12, 32) and attn.wk.weight.shape == (2 * 12, 32)
    assert attn.wo.weight.shape == (32, 48) and model.rope_cos.shape == (24, 6)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name


def test_recompute_equals_keeping_the_activations_with_every_feature_on():
    """Bitwise on CPU, as tests/unit/test_recompute.py shows for the plain model."""
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for mode in ("none", "ffn", "full"):
        model = _rich()
        model.set_recompute(mode)
        out = model(x, x)
        out.loss.backward()
        results.append((out.loss, [p.grad for p in model.parameters()]))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


def test_compiled_modules_equal_eager_with_every_feature_on():
    eager = _rich()
    compiled = copy.deepcopy(eager)
    compiled.compile_modules()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    outs = [m(x, x) for m in (eager, compiled)]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
