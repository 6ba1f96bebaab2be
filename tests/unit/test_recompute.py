"""train.recompute (activation checkpointing): the same numbers as keeping the activations,
and less memory held between forward and backward.

Recomputing runs the same operations on the same inputs, so on CPU the loss, every gradient
and the routing statistics are bitwise equal, not merely close. (Expert and tensor
parallelism with recompute: tests/distributed/test_layouts.py.)
"""

import pytest
import torch

from benchmarks.saved_tensors import held_bytes
from model.config import ModelConfig, MoEConfig
from model.errors import ConfigError
from model.transformer import TransformerLM
from tests.recompute_probe import FeedForwardCalls

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, ffn_hidden=64, max_seq_len=16)
# every_n_layers=2: blocks with a dense FFN and blocks with an MoE layer.
MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, every_n_layers=2)


def _step(mode: str, moe: MoEConfig = MOE, cfg: ModelConfig = CFG, autocast: bool = False):
    torch.manual_seed(0)
    model = TransformerLM(cfg, moe)
    model.set_recompute(mode)
    calls = FeedForwardCalls(model)
    x = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, x)
    out.loss.backward()
    calls.expect(mode)
    return out, {n: p.grad for n, p in model.named_parameters()}


def _assert_same_step(a, b) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    for field in ("loss", "lm_loss", "aux_loss", "z_loss", "expert_counts_LE", "router_entropy_L",
                  "dropped_slots_L"):
        assert torch.equal(getattr(out_a, field), getattr(out_b, field)), field
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), f"grad of {name}"


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("mode", ["ffn", "full"])
def test_recompute_gives_the_same_loss_gradients_and_statistics(mode, autocast):
    _assert_same_step(_step(mode, autocast=autocast), _step("none", autocast=autocast))


@pytest.mark.parametrize("mode", ["ffn", "full"])
def test_recompute_replays_the_random_gating_of_the_deepspeed_backend(mode):
    """DeepSpeed's random token selection and rsample noise draw from the RNG in forward; the
    recompute restores the RNG first, so it routes and drops exactly as the first run did."""
    moe = MoEConfig(backend="deepspeed", num_experts=4, top_k=1, expert_hidden=16, capacity_factor=1.0,
                    drop_tokens=True, use_rts=True, noisy_gate_policy="rsample")
    reference = _step("none", moe)
    assert reference[0].dropped_slots_L.sum() > 0  # the capacity drops tokens: RTS chose which
    _assert_same_step(_step(mode, moe), reference)


def _held(mode: str, n_layers: int) -> int:
    """Bytes a forward leaves held for its backward (and its output), parameters aside."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**{**vars(CFG), "n_layers": n_layers}), MOE)
    model.set_recompute(mode)
    x = torch.randint(0, CFG.vocab_size, (3, 16))
    held, _ = held_bytes(lambda: model(x, x), [*model.parameters(), *model.buffers(), x])
    return held


def test_full_recompute_holds_one_input_per_block_and_ffn_holds_less_than_none():
    """Per two blocks (one dense, one MoE): `full` holds exactly their two (B, S, D) fp32 inputs
    and the MoE layer's statistics the model returns (E int64 counts, the fp32 entropy, the int64
    dropped-slot count); `ffn` holds the attention's activations but not the feed-forwards';
    `none` holds all."""
    per_two_blocks = {mode: _held(mode, 4) - _held(mode, 2) for mode in ("none", "ffn", "full")}
    inputs, statistics = 2 * 3 * 16 * CFG.dim * 4, MOE.num_experts * 8 + 4 + 8
    assert per_two_blocks["full"] == inputs + statistics, per_two_blocks
    assert per_two_blocks["full"] < per_two_blocks["ffn"] < per_two_blocks["none"], per_two_blocks


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_nothing_outlives_a_recomputed_step(backend):
    """After forward, backward and clearing the gradients, a recomputed step leaves nothing
    behind. DeepSpeed's MOELayer keeps its last aux loss (l_aux); the one from the recompute
    inside backward is never backpropagated, and kept it would hold that rerun's activations
    until the layer's next forward (the deepspeed backend drops it)."""
    moe = MoEConfig(backend=backend, num_experts=4, top_k=2, expert_hidden=16, every_n_layers=2,
                    **({"drop_tokens": False} if backend == "deepspeed" else {}))
    left = {}
    for mode in ("none", "ffn", "full"):
        torch.manual_seed(0)
        model = TransformerLM(CFG, moe)
        model.set_recompute(mode)
        x = torch.randint(0, CFG.vocab_size, (3, 16))

        def step():
            model(x, x).loss.backward()
            model.zero_grad(set_to_none=True)

        left[mode], _ = held_bytes(step, [*model.parameters(), *model.buffers(), x])
    assert left["ffn"] <= left["none"] and left["full"] <= left["none"] < 1024, left


def test_held_bytes_counts_what_outlives_the_call_once():
    w = torch.randn(8, 5, requires_grad=True)
    x = torch.randn(7, 8)

    def forward():
        h = x @ w  # mm keeps x and w (existing) for backward; h itself dies after relu
        return torch.relu(h).t()  # relu keeps its output; .t() is a view of the same storage

    held, y = held_bytes(forward, [w, x])
    assert held == 7 * 5 * 4
    y.sum().backward()
    assert w.grad is not None


def test_an_unknown_recompute_mode_names_the_choices():
    with pytest.raises(ConfigError, match=r"train.recompute \('blocks'\) must be one of: none, ffn, full"):
        TransformerLM(CFG, MOE).set_recompute("blocks")
