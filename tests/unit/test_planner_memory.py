"""The planner's per-rank inventories against the model in one process (world of one, CPU).

- Activations kept for backward: planner/activations.py's entries summed, against
  benchmarks/saved_tensors.saved_tensor_bytes around the model's forward, exactly, for every
  model feature that changes what autograd keeps, in fp32, bf16 autocast (stage 0's bf16) and
  bf16 weights (ZeRO's bf16 mode), and each train.recompute mode.
- Parameters: planner/params.py's list (names, shapes, order) equals model.named_parameters().
- Stage 0's states: 4 + 4 + 8 bytes per parameter, the model's own count.
Distributed layouts (tp, ep, ZeRO 1-2) are held to the trainer in
tests/distributed/test_planner.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks.saved_tensors import saved_tensor_bytes
from launcher.config import load_config
from model.transformer import TransformerLM
from planner.activations import activations
from planner.model_states import model_states
from planner.params import parameters
from planner.shapes import make_shapes

BASE = ["--config", "configs/cpu_tiny.yaml", "--model.dim=32", "--model.n_layers=2",
        "--model.n_heads=4", "--model.ffn_hidden=48", "--moe.num_experts=4", "--moe.expert_hidden=24",
        "--moe.every_n_layers=2", "--train.micro_batch_size=2", "--train.seq_len=8",
        "--parallel.dp=1", "--parallel.ep=1"]
FEATURES = {
    "dense and MoE block": [], "MoE every block": ["--moe.every_n_layers=1"],
    "grouped-query attention": ["--model.n_kv_heads=2"], "QK-norm per head": ["--model.qk_norm=head"],
    "QK-norm over the projection": ["--model.qk_norm=proj"], "qkv bias": ["--model.qkv_bias=true"],
    "shared expert": ["--moe.shared_expert_hidden=40"],
    "gated shared expert": ["--moe.shared_expert_hidden=40", "--moe.shared_expert_gate=true"],
    "sigmoid scores": ["--moe.score_func=sigmoid"], "expert bias": ["--moe.expert_bias=true"],
    "group-limited routing": ["--moe.n_group=2", "--moe.topk_group=1"],
    "no renormalisation": ["--moe.renormalize=false"], "top-1": ["--moe.top_k=1"],
    "pooled aux loss": ["--moe.aux_loss_form=pooled"], "tied embeddings": ["--model.tie_embeddings=true"],
    "recompute ffn": ["--train.recompute=ffn", "--moe.shared_expert_hidden=40"],
    "recompute full": ["--train.recompute=full"],
}
MODES = {"fp32": [], "autocast": ["--train.precision=bf16"],
         "bf16 weights": ["--train.precision=bf16", "--parallel.zero_stage=1"]}


def _measured(job, mode: str) -> int:
    torch.manual_seed(0)
    model = TransformerLM(job.model, job.moe)
    if mode == "bf16 weights":  # what DeepSpeed's bf16 mode makes of the model
        model = model.bfloat16()
    model.set_recompute(job.train.recompute)
    tr = job.train
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 256, (tr.micro_batch_size, tr.seq_len), generator=gen) for _ in range(2))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast"
                else contextlib.nullcontext())

    def forward():
        with autocast:
            return model(x, y)

    held, _ = saved_tensor_bytes(forward, [*model.parameters(), *model.buffers()])
    return held


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("feature", FEATURES)
def test_activations_equal_what_autograd_keeps(feature, mode):
    job = load_config(BASE + FEATURES[feature] + MODES[mode])
    s = make_shapes(job, 1, device="cpu")
    assert s.precision.name == {"fp32": "fp32", "autocast": "autocast", "bf16 weights": "bf16"}[mode]
    assert activations(s).total(s) == _measured(job, mode)


@pytest.mark.parametrize("extra", [[], ["--model.tie_embeddings=true", "--moe.shared_expert_hidden=64",
                                        "--moe.shared_expert_gate=true", "--model.qk_norm=proj",
                                        "--model.qkv_bias=true"], ["--moe.first_k_dense=1"]])
def test_parameters_are_the_models_in_its_order(extra):
    job = load_config(["--config", "configs/cpu_tiny.yaml", "--parallel.dp=1", "--parallel.ep=1", *extra])
    s = make_shapes(job, 1, device="cpu")
    model = TransformerLM(job.model, job.moe)
    assert [(p.name, p.shape) for p in parameters(s)] == [
        (n, tuple(p.shape)) for n, p in model.named_parameters()]
    n = sum(p.numel() for p in model.parameters())
    assert model_states(s) == type(model_states(s))(4 * n, 4 * n, 8 * n, 0)


def test_cuda_rms_norm_keeps_input_and_inverse_rms_only():
    """The fused kernel's formula (_fused_rms_norm: input, rstd, weight), where the CPU's
    composite also keeps the normalised input: the CUDA plan keeps T x D fewer per norm."""
    job = load_config(BASE + ["--train.precision=fp32"])
    cpu, cuda = make_shapes(job, 1, device="cpu"), make_shapes(job, 1, device="cuda")
    norms = 2 * job.model.n_layers + 1
    T, D = cpu.tokens, job.model.dim
    assert activations(cpu).total(cpu) - activations(cuda).total(cuda) == norms * T * D * 4
