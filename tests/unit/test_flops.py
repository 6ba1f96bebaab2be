"""The MFU numerator (model/flops.py) against parameters counted on real models, and the
step timer and peak lookup beside it."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig, MoEConfig
from model.flops import known_peak_flops, model_cost
from model.transformer import TransformerLM
from trainer.metrics import StepTimer, peak_flops, peak_memory


@pytest.mark.parametrize("every_n, tie, shared", [(1, False, 0), (2, True, 0), (0, False, 0), (2, False, 80)])
def test_total_params_match_the_model(every_n, tie, shared):
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=4, n_heads=4, ffn_hidden=96,
                      tie_embeddings=tie)
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=48, every_n_layers=every_n,
                    shared_expert_hidden=shared)
    model = TransformerLM(cfg, moe)
    assert model_cost(cfg, moe, 128).total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shared", [0, 80])
def test_activated_params_leave_out_the_unchosen_experts_and_the_embedding(shared):
    """Every token passes the shared expert, so all its parameters count as activated."""
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=4, n_heads=4, ffn_hidden=96)
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=48, every_n_layers=2,
                    shared_expert_hidden=shared)
    model = TransformerLM(cfg, moe)
    cost = model_cost(cfg, moe, 128)
    per_expert = 3 * 64 * 48
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    expected = (cost.total_params - model.tok_embeddings.weight.numel() - norms
                - len(model.moe_layers()) * (8 - 2) * per_expert)
    assert cost.activated_params == expected


def test_a_dense_model_costs_six_flops_per_parameter_plus_causal_attention():
    cfg = ModelConfig(vocab_size=1000, dim=128, n_layers=2, n_heads=4, ffn_hidden=256)
    moe = MoEConfig(every_n_layers=0)
    seq = 512
    n = 2 * (4 * 128 * 128 + 3 * 128 * 256) + 128 * 1000
    attention = 2 * 3 * 2 * 2 * 128 * (seq + 1) / 2  # layers x (fwd+bwd) x (QK, AV) x 2 D x keys
    assert model_cost(cfg, moe, seq).flops_per_token == pytest.approx(6 * n + attention)


def test_step_timer_leaves_out_the_warmup_steps():
    timer = StepTimer(warmup_fraction=0.1)
    for seconds in [5.0] + [0.5] * 19:
        timer.add(seconds)
    assert timer.steady() == (18, pytest.approx(9.0))  # 2 of 20 skipped
    one = StepTimer()
    one.add(2.0)
    assert one.steady() == (1, 2.0)


def test_peak_flops_needs_a_known_gpu_or_a_configured_figure():
    assert known_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert known_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert known_peak_flops("NVIDIA H100 NVL") == 835e12
    assert known_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert known_peak_flops("Tesla T4") is None
    assert peak_flops(torch.device("cpu"), 0.0) is None
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12
    memory, kind = peak_memory(torch.device("cpu"))
    assert kind == "cpu_max_rss" and memory > 10 * 2**20


def test_the_gpu_benchmark_config_is_the_model_issue_6_describes():
    from launcher.config import load_config

    job = load_config(["--config", "configs/gpu_moe_1b.yaml"])
    assert job.validate(world_size=1).dp == 1
    cost = model_cost(job.model, job.moe, job.train.seq_len)
    assert 1.5e9 < cost.total_params < 1.8e9 and 0.25e9 < cost.activated_params < 0.3e9
    assert (job.model.n_layers, job.model.dim, job.moe.num_experts, job.moe.expert_hidden,
            job.moe.top_k, job.train.seq_len) == (16, 1024, 64, 512, 8, 2048)
