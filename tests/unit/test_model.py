"""The transformer on one process: shapes, losses, MoE placement, schedule."""

import math

import pytest
import torch

from model.config import ModelConfig, MoEConfig
from model.layers import RMSNorm, apply_rotary, rotary_tables
from model.moe import MoELayer
from model.moe.experts import EAGER, compiled_pointwise
from model.transformer import TransformerLM
from trainer.config import TrainConfig
from trainer.optim import build_optimizer, lr_at

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, ffn_hidden=64, max_seq_len=16)


def test_moe_every_n_layers():
    m = TransformerLM(CFG, MoEConfig(num_experts=4, top_k=2, expert_hidden=16, every_n_layers=2))
    assert [isinstance(b.ffn, MoELayer) for b in m.layers] == [False, True, False, True]
    assert len(TransformerLM(CFG, MoEConfig(every_n_layers=0)).moe_layers()) == 0


def test_forward_shapes_and_initial_loss_near_uniform():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=16)
    m = TransformerLM(CFG, moe)
    x = torch.randint(0, 64, (3, 16))
    out = m(x, x)
    assert out.logits.shape == (3, 16, 64)
    assert out.expert_counts_LE.shape == (4, 4) and out.expert_counts_LE.sum() == 4 * 3 * 16 * 2
    assert abs(out.lm_loss.item() - math.log(64)) < 0.1
    total = out.lm_loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.z_loss
    torch.testing.assert_close(out.loss, total)
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("x_dtype, w_dtype, tol", [
    (torch.float32, torch.float32, 1e-6),  # fp32, and the fp32 residual stream under autocast
    (torch.bfloat16, torch.bfloat16, 1e-2),  # a bf16 model (ZeRO's bf16 mode)
    (torch.bfloat16, torch.float32, 1e-2),  # bf16 input, fp32 gain: fp32 out
])
def test_rms_norm_and_rotary_equal_their_definitions_in_float64(x_dtype, w_dtype, tol):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * g. Rotary: each pair (x[2i], x[2i+1]) rotated by
    position * theta^(-2i/Dh), on q laid out as attention makes it (a transposed view)."""
    torch.manual_seed(0)
    norm = RMSNorm(32, 1e-5).to(w_dtype)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 32).to(x_dtype).requires_grad_()
    x64, g64 = x.detach().double().requires_grad_(), norm.weight.detach().double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * g64
    got = norm(x)
    assert got.dtype == torch.promote_types(x_dtype, w_dtype)
    grad = torch.randn(want.shape, dtype=torch.float64)
    got.backward(grad.to(got.dtype))
    want.backward(grad)
    for a, b in ((got, want), (x.grad, x64.grad)):
        assert (a.double() - b).abs().max() <= tol * b.abs().max()

    cos, sin = rotary_tables(8, 5, 10_000.0)
    q = torch.randn(2, 5, 3, 8).to(x_dtype).transpose(1, 2).requires_grad_()  # (B, H, S, Dh)
    q64 = q.detach().double().requires_grad_()
    angle = torch.arange(5.0, dtype=torch.float64)[:, None] * 10_000.0 ** (-torch.arange(0, 8, 2) / 8)
    c, s = angle.cos(), angle.sin()
    want = torch.stack((q64[..., 0::2] * c - q64[..., 1::2] * s, q64[..., 0::2] * s + q64[..., 1::2] * c), -1)
    got = apply_rotary(q, cos, sin)
    assert got.dtype == x_dtype and got.shape == q.shape
    grad = torch.randn(q.shape, dtype=torch.float64)
    got.backward(grad.to(x_dtype))
    want.flatten(-2).backward(grad)
    for a, b in ((got, want.flatten(-2)), (q.grad, q64.grad)):
        assert (a.double() - b).abs().max() <= tol * b.abs().max()


def test_sequence_longer_than_rotary_tables_is_refused():
    m = TransformerLM(CFG, MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    with pytest.raises(ValueError, match=r"sequence length \(17\) exceeds model.max_seq_len \(16\)"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_causality():
    torch.manual_seed(0)
    m = TransformerLM(CFG, MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    x = torch.randint(0, 64, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 64
    torch.testing.assert_close(m(x).logits[0, :10], m(y).logits[0, :10])


def test_lr_schedule_warmup_then_cosine_to_floor():
    """Warmup over steps 0..9, then cosine from step 10 to the last step, 110: 100 steps, so
    steps 35, 60 and 85 are a quarter, half and three quarters of the way (cos = sqrt(2)/2,
    0, -sqrt(2)/2), each value exact to rounding."""
    cfg = TrainConfig(steps=111, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    exact = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 35: 0.1 + 0.45 * (1 + math.sqrt(0.5)), 60: 0.55,
             85: 0.1 + 0.45 * (1 - math.sqrt(0.5)), 110: 0.1, 200: 0.1}
    for step, want in exact.items():
        assert lr_at(step, cfg) == pytest.approx(want, rel=1e-12, abs=0), step
    assert all(lr_at(s, cfg) > lr_at(s + 1, cfg) for s in range(10, 110))


def test_weight_decay_only_on_matrices():
    m = TransformerLM(CFG, MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    opt = build_optimizer(list(m.parameters()), TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_compile_modules_equals_eager_and_keeps_names():
    """train.compile: the same loss and gradients as eager (fp32, up to kernel rounding), the
    same state-dict names (checkpoints unchanged), one graph per module type for all blocks,
    and the MoE layers' elementwise work fused too. With train.recompute=full as well: the same
    numbers, and no further graphs."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    # every_n_layers=2: dense FFN blocks (compiled) and MoE blocks (eager) both present; the
    # MoE blocks' shared expert is compiled as the dense FFN is (the same shapes: one graph).
    eager = TransformerLM(CFG, MoEConfig(num_experts=4, top_k=2, expert_hidden=16, every_n_layers=2,
                                         shared_expert_hidden=CFG.ffn_hidden))
    compiled, recomputed = copy.deepcopy(eager), copy.deepcopy(eager)
    recomputed.set_recompute("full")
    for m in (compiled, recomputed):
        m.compile_modules()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all(m.fused and m.experts.pointwise is compiled_pointwise() for m in compiled.moe_layers())
    assert all(not m.fused and m.experts.pointwise is EAGER for m in eager.moe_layers())
    assert all(m.shared._compiled_call_impl is not None for m in compiled.moe_layers())
    torch._dynamo.reset()
    counters.clear()
    x = torch.randint(0, 64, (2, 16))
    outs = [m(x, x) for m in (eager, compiled, recomputed)]
    for out in outs:
        out.loss.backward()
    for model, out in ((compiled, outs[1]), (recomputed, outs[2])):
        torch.testing.assert_close(out.loss, outs[0].loss, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # norm, attention, dense SwiGLU; the MoE layers' SwiGLU forward and backward, combine
    # forward, its two gradients, the dispatch's gradient: 9 graphs whatever the number of
    # blocks (no recompiles).
    assert counters["stats"]["unique_graphs"] == 9, dict(counters["stats"])
