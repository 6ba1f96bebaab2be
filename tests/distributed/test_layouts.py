"""Every parallel layout computes the same training step as one process without parallelism.

For each (dp, tp, ep) on 4 (or 8) gloo ranks: the same weights and the same global batch; the
reference runs in each process on the plain model and averages the dp ranks' losses (the
data-parallel objective). Compared: logits and loss of this rank's batch, every gradient
after reduction (shards gathered to global shape), the clipped global norm, and every
parameter after one AdamW step. fp32 tolerance: rtol 1e-4, atol 1e-5.
"""

import dataclasses

import pytest
import torch

from model.config import ModelConfig, MoEConfig
from model.transformer import TransformerLM
from tests.distributed.gather import gather_global
from parallel.data_parallel import clip_gradients_, reduce_gradients
from parallel.expert_parallel import apply_expert_parallel, split_parameters
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import Layout, Topology
from tests.distributed.spawn import case_result, run_cases, run_distributed
from tests.recompute_probe import FeedForwardCalls
from trainer.config import TrainConfig
from trainer.optim import build_optimizer

TOL = dict(rtol=1e-4, atol=1e-5)
CFG = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, ffn_hidden=64, max_seq_len=16)
# Blocks 1 and 3 are MoE (every 2nd), block 2 dense: both kinds of FFN under every layout.
MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, every_n_layers=2,
                aux_loss_coef=0.1, z_loss_coef=0.01)
TRAIN = TrainConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5)
NATIVE = {f: getattr(MoEConfig, f) for f in ("backend", "drop_tokens", "use_rts")}
# What HF families bring, all at once: grouped key/value heads (2 for 4 query heads), a head
# size of 12 (not 32 / 4), q/k/v biases, QK-norm, sigmoid scores with a choice bias chosen
# within 2 of 4 groups and scaled weights, a shared expert behind a sigmoid gate, a dense
# first block, and transformers' pooled load-balancing loss.
HF_CFG = dataclasses.replace(CFG, n_kv_heads=2, head_dim=12, qkv_bias=True)
HF_MOE = MoEConfig(num_experts=8, top_k=2, expert_hidden=16, score_func="sigmoid", n_group=4,
                   topk_group=2, expert_bias=True, routed_scaling_factor=2.0,
                   shared_expert_hidden=24, shared_expert_gate=True, first_k_dense=1,
                   aux_loss_form="pooled", aux_loss_coef=0.1, z_loss_coef=0.01)


def _configs(backend, shared, hf):
    """(model, moe) configs: the plain ones, or with `hf` ("head" or "proj") the HF-family
    features with that QK-norm."""
    if hf:
        return dataclasses.replace(HF_CFG, qk_norm=hf), HF_MOE
    moe = dataclasses.replace(MOE, shared_expert_hidden=shared)
    if backend == "deepspeed":  # dropless and deterministic; its aux loss differs for top-2
        moe = dataclasses.replace(moe, aux_loss_coef=0.0, backend="deepspeed", drop_tokens=False,
                                  use_rts=False)
    return CFG, moe


def _step(rank, world, dp, tp, ep, backend="native", recompute="none", shared=0, hf=None):
    """The reference is always the native backend on one process, keeping its activations;
    `backend` is the layer the parallel model uses, loaded with the reference's (canonical)
    weights, `recompute` its train.recompute (the collectives run again in backward),
    `shared` both models' moe.shared_expert_hidden and `hf` the HF-family model's QK-norm."""
    topo = Topology.create(Layout(world_size=world, dp=dp, ep=ep, tp=tp))
    torch.manual_seed(0)
    cfg, moe = _configs(backend, shared, hf)
    shared = moe.shared_expert_hidden
    ref = TransformerLM(cfg, dataclasses.replace(moe, **NATIVE))
    with torch.no_grad():  # gains, biases and the expert bias away from 1 and 0
        for name, t in [*ref.named_parameters(), *ref.named_buffers()] if hf else []:
            if t.dim() == 1 and "rope" not in name:
                t.add_(torch.randn(t.shape) * 0.1)
    model = TransformerLM(cfg, moe)
    model.load_state_dict(ref.state_dict())
    model.set_recompute(recompute)
    calls = FeedForwardCalls(model)
    apply_tensor_parallel(model, topo)
    apply_expert_parallel(model, topo)
    for layer in model.moe_layers():  # a shared expert is split by tp, not replicated
        assert layer.shared is None or layer.shared.w2.weight.shape == (CFG.dim, shared // tp)
    if hf:  # query and key/value heads split alike; a whole-projection QK-norm's gain too
        attn = model.layers[0].attention
        assert (attn.n_heads, attn.n_kv_heads, attn.wk.bias.shape) == (4 // tp, 2 // tp, (24 // tp,))
        assert attn.q_norm.weight.shape == ((48 // tp,) if hf == "proj" else (12,))
    tokens = torch.randint(0, 64, (dp, 4, 17), generator=torch.Generator().manual_seed(1))
    d = topo.coord("dp")

    ref_out = [ref(tokens[r, :, :-1], tokens[r, :, 1:]) for r in range(dp)]
    sum(o.loss for o in ref_out).div(dp).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), TRAIN.grad_clip)
    build_optimizer(list(ref.parameters()), TRAIN).step()

    out = model(tokens[d, :, :-1], tokens[d, :, 1:])
    torch.testing.assert_close(out.logits, ref_out[d].logits, **TOL)
    torch.testing.assert_close(out.loss, ref_out[d].loss, **TOL)
    if backend == "native":
        torch.testing.assert_close(out.aux_loss, ref_out[d].aux_loss, **TOL)
    out.loss.backward()
    calls.expect(recompute)
    dense, expert = split_parameters(model)
    reduce_gradients(dense, expert, topo)
    grads = gather_global(model, topo, {n: p.grad for n, p in model.named_parameters()})
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, **TOL, msg=f"grad of {name}")
    norm = clip_gradients_(dense, expert, TRAIN.grad_clip, topo)
    torch.testing.assert_close(norm, ref_norm, **TOL)
    build_optimizer(dense + expert, TRAIN).step()
    params = gather_global(model, topo, {n: p.detach() for n, p in model.named_parameters()})
    for name, want in ref.named_parameters():
        # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, fp32 noise in g
        # (summation order) moves the update by a visible fraction of lr. Those entries are
        # compared as gradients above; here only well-conditioned ones.
        ok = ref_grads[name].abs() > 1e-6
        torch.testing.assert_close(params[name][ok], want.detach()[ok], **TOL, msg=f"{name} after a step")
    return norm.item()


LAYOUTS = [  # (dp, tp, ep)
    (4, 1, 1), (4, 1, 2), (4, 1, 4),  # edp 4, 2, 1: expert grads neither doubled nor / ep
    (2, 2, 1), (2, 2, 2),              # tp with experts replicated over tp partners
    (1, 4, 1),                         # tp alone
    (4, 2, 4),                         # 8 ranks: ep groups [0,2,4,6] [1,3,5,7]
]


CASES = [(dp, tp, ep, "native") for dp, tp, ep in LAYOUTS] + [(4, 1, ep, "deepspeed") for ep in (1, 2, 4)]
RECOMPUTED = [(2, 2, 2, "native", "full"), (4, 1, 4, "native", "ffn"), (4, 1, 2, "deepspeed", "full")]
# A shared expert (moe.shared_expert_hidden) split by tp 2 like a dense FFN, and beside
# DeepSpeed's routed experts.
SHARED = [(2, 2, 2, "native", "none", 24), (4, 1, 2, "deepspeed", "none", 24)]
HF_FEATURES = [(2, 2, 2, "native", "none", 0, "proj"), (4, 1, 4, "native", "none", 0, "proj"),
               (2, 2, 2, "native", "none", 0, "head")]
CASES += RECOMPUTED + SHARED + HF_FEATURES


@pytest.fixture(scope="module")
def results():
    """Every case of one world size in one set of processes."""
    out = {}
    for world in sorted({c[0] * c[1] for c in CASES}):
        out |= run_cases(_step, world, [c for c in CASES if c[0] * c[1] == world], timeout_s=400)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("dp, tp, ep", LAYOUTS, ids=[f"dp{a}-tp{b}-ep{c}" for a, b, c in LAYOUTS])
def test_layout_step_equals_single_process_reference(results, dp, tp, ep):
    norms = case_result(results, (dp, tp, ep, "native"))
    assert len(set(round(n, 6) for n in norms)) == 1  # every rank clips by the same norm


@pytest.mark.distributed
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_deepspeed_backend_step_equals_native_reference(results, ep):
    """moe.backend=deepspeed, dropless (drop_tokens false, no sampling), dp 4: logits, loss,
    every gradient and the parameters after one step equal the native one-process reference.
    The load-balancing loss is left out (coefficient 0): DeepSpeed's top-2 form counts only
    first choices, by design; the z-loss is in."""
    case_result(results, (4, 1, ep, "deepspeed"))


@pytest.mark.distributed
@pytest.mark.parametrize("case", RECOMPUTED, ids=[f"dp{a}-tp{b}-ep{c}-{d}-{e}" for a, b, c, d, e in RECOMPUTED])
def test_recomputed_step_equals_single_process_reference(results, case):
    """train.recompute with tensor and expert parallelism: the backward runs the blocks' (or
    the feed-forwards') forward again, all-to-alls and tp collectives included, on every rank
    in the same order, and the step still equals the reference."""
    case_result(results, case)


@pytest.mark.distributed
@pytest.mark.parametrize("case", SHARED, ids=[f"dp{a}-tp{b}-ep{c}-{d}" for a, b, c, d, _, _ in SHARED])
def test_shared_expert_step_equals_single_process_reference(results, case):
    """moe.shared_expert_hidden: the shared expert's weights split over the tp ranks (w1, w3
    by rows, w2 by columns) and its gradients reduced over all of dp as dense ones, next to
    expert-parallel routed experts, native and deepspeed; the step equals the reference."""
    case_result(results, case)


@pytest.mark.distributed
@pytest.mark.parametrize("case", HF_FEATURES, ids=[f"dp{c[0]}-tp{c[1]}-ep{c[2]}-qk_norm_{c[6]}" for c in HF_FEATURES])
def test_hf_family_features_step_equals_single_process_reference(results, case):
    """GQA, head_dim, q/k/v biases, QK-norm (over each head: its gain's gradient summed over
    the tp ranks; over the whole projection: the sum of squares all-reduced over them),
    sigmoid grouped routing with a choice bias and scaling at ep, a gated shared expert and
    a dense first block: logits, loss (pooled aux loss), every gradient, the clipped norm and
    the parameters after a step equal the one-process reference."""
    case_result(results, case)


def _compiled_tp_step(rank, world):
    """train.compile at tp 2: an eager and a compiled model from the same weights. What is
    under test is where dynamo cuts the graphs, so the blocks' attention and dense FFN (the
    modules holding tp collectives) are compiled with the aot_eager backend: Inductor's
    kernels cost half a minute of C++ here and are checked by tests/unit/test_model.py."""
    import copy

    from torch._dynamo.utils import counters

    topo = Topology.create(Layout(world_size=world, dp=1, ep=1, tp=world))
    torch.manual_seed(0)
    eager = TransformerLM(CFG, dataclasses.replace(MOE, every_n_layers=0))
    compiled = copy.deepcopy(eager)
    apply_tensor_parallel(eager, topo)
    apply_tensor_parallel(compiled, topo, compiled=True)
    for block in compiled.layers:
        block.attention.compile(backend="aot_eager")
        block.ffn.compile(backend="aot_eager")
    counters.clear()
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    outs = [m(tokens[:, :-1], tokens[:, 1:]) for m in (eager, compiled)]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    return {reason.split("\n")[0]: n for reason, n in counters["graph_break"].items()}


@pytest.mark.distributed
def test_compiled_tp2_equals_eager_with_the_collectives_outside_the_graphs():
    """train.compile with tensor parallelism: the same loss and gradients as eager on every
    rank, and the tp comm's collectives are clean graph breaks (torch.compiler.disable), not
    traced (without it dynamo breaks inside them, at the collectives' bookkeeping)."""
    for breaks in run_distributed(_compiled_tp_step, 2, timeout_s=300):
        assert set(breaks) == {"Skip calling `torch.compiler.disable()`d function"}, breaks
