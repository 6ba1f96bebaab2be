"""The transformer on one process: shapes, losses, MoE placement, schedule."""

import math

import pytest
import torch

from model.config import ModelConfig, MoEConfig
from model.moe import MoELayer
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
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(109, cfg) == pytest.approx(0.1)
    mid = 10 + (110 - 10 - 1) / 2
    assert lr_at(int(mid), cfg) == pytest.approx(0.55, abs=0.02)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 109))


def test_weight_decay_only_on_matrices():
    m = TransformerLM(CFG, MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    opt = build_optimizer(list(m.parameters()), TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_compile_dense_equals_eager_and_keeps_names():
    """train.compile: the same loss and gradients as eager (fp32, up to kernel rounding), the
    same state-dict names (checkpoints unchanged), one graph per module type for all blocks."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    # every_n_layers=2: dense FFN blocks (compiled) and MoE blocks (eager) both present.
    eager = TransformerLM(CFG, MoEConfig(num_experts=4, top_k=2, expert_hidden=16, every_n_layers=2))
    compiled = copy.deepcopy(eager)
    compiled.compile_dense()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    x = torch.randint(0, 64, (2, 16))
    outs = [m(x, x) for m in (eager, compiled)]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # norm, attention, dense SwiGLU: 3 graphs whatever the number of blocks (no recompiles).
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
