"""ZeRO stages 1 and 2 through DeepSpeed equal our zero_stage 0 and plain AdamW on one process.

Three optimizer steps with gradient accumulation 2, clipping and a changing learning rate, on
the same weights and data, for dp2 (ep 1 and 2) and dp2 x tp2 x ep2. Compared with a
one-process reference (plain torch AdamW on the unsharded model, loss = mean over dp ranks and
micro-batches): the pre-clip global gradient norm of every step (rtol 1e-4: the norm is what
reveals a gradient scaled by ep, which Adam's update alone would hide) and every parameter
after the third step (atol 1e-5, rtol 1e-4, over entries whose gradients are not ~0, see
test_layouts.py). Also: the groups DeepSpeed uses are our groups, not copies. Stage 2 runs with
train.recompute=full: its gradient hooks see the blocks' forward run again inside backward.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from model.config import ModelConfig, MoEConfig
from model.transformer import TransformerLM
from tests.distributed.gather import gather_global
from parallel.expert_parallel import apply_expert_parallel
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import Layout, Topology
from tests.distributed.spawn import case_result, run_cases
from tests.recompute_probe import FeedForwardCalls
from trainer.config import TrainConfig
from trainer.optim import build_optimizer, build_stepper, lr_at

TOL = dict(rtol=1e-4, atol=1e-5)
CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16)
MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, aux_loss_coef=0.1, z_loss_coef=0.01)
TRAIN = TrainConfig(steps=3, lr=1e-2, warmup_steps=1, weight_decay=0.1, grad_clip=0.3,
                    micro_batch_size=4, grad_accum=2)


def _reference(model, tokens, dp):
    opt = build_optimizer(list(model.parameters()), TRAIN)
    norms, last_grads = [], None
    for step in range(TRAIN.steps):
        opt.zero_grad()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, TRAIN)
        for micro in range(TRAIN.grad_accum):
            for r in range(dp):
                x = tokens[step, micro, r]
                (model(x[:, :-1], x[:, 1:]).loss / (dp * TRAIN.grad_accum)).backward()
        last_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip))
        opt.step()
    return torch.stack(norms), last_grads


def _check_groups_are_ours(stepper, topo):
    from deepspeed.utils import groups

    name = f"ep_size_{topo.size('ep')}"
    assert groups._get_expert_parallel_group(name) is topo.groups["ep"]
    assert groups._get_expert_data_parallel_group(name) is topo.groups["edp"]
    assert groups._get_data_parallel_group() is topo.groups["dp"]
    zero = stepper.optimizer
    ranks = [dist.get_process_group_ranks(g) for g in zero.real_dp_process_group]
    want = {tuple(g) for kind in ("dp", "edp") for g in topo.layout.group_ranks(kind) if topo.rank in g}
    assert {tuple(r) for r in ranks} == want, (ranks, want)


def _run(rank, world, dp, tp, ep):
    topo = Topology.create(Layout(world_size=world, dp=dp, ep=ep, tp=tp))
    torch.manual_seed(0)
    base = TransformerLM(CFG, MOE)
    shape = (TRAIN.steps, TRAIN.grad_accum, dp, TRAIN.micro_batch_size, 17)
    tokens = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(base)
    ref_norms, ref_grads = _reference(ref, tokens, dp)
    d = topo.coord("dp")
    for stage in (0, 1, 2):
        model = copy.deepcopy(base)
        apply_tensor_parallel(model, topo)
        apply_expert_parallel(model, topo)
        recompute = "full" if stage == 2 else "none"  # changes no number (test_recompute.py)
        model.set_recompute(recompute)
        calls = FeedForwardCalls(model)
        stepper = build_stepper(model, topo, TRAIN, stage, local_rank=rank)
        if stage:
            _check_groups_are_ours(stepper, topo)
        norms = []
        for step in range(TRAIN.steps):
            stepper.begin(lr_at(step, TRAIN))
            for micro in range(TRAIN.grad_accum):
                x = tokens[step, micro, d]
                stepper.backward(stepper.forward(x[:, :-1], x[:, 1:]).loss)
            norms.append(stepper.finish().float().reshape(()))
            stepper.update()
        calls.expect(recompute, steps=TRAIN.steps * TRAIN.grad_accum)
        torch.testing.assert_close(torch.stack(norms), ref_norms, rtol=1e-4, atol=0,
                                   msg=f"grad norms, zero_stage {stage}")
        params = gather_global(model, topo, {n: p.detach() for n, p in model.named_parameters()})
        for name, want in ref.named_parameters():
            ok = ref_grads[name].abs() > 1e-6
            torch.testing.assert_close(params[name][ok], want.detach()[ok], **TOL,
                                       msg=f"{name}, zero_stage {stage}")
    return ref_norms.tolist()


LAYOUTS = [(2, 2, 1, 1), (2, 2, 1, 2), (4, 2, 2, 2)]  # (world, dp, tp, ep)


@pytest.fixture(scope="module")
def results():
    """The layouts of one world size in one set of processes."""
    out = {}
    for world in sorted({w for w, *_ in LAYOUTS}):
        cases = [tuple(c[1:]) for c in LAYOUTS if c[0] == world]
        out |= run_cases(_run, world, cases, timeout_s=400)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world, dp, tp, ep", LAYOUTS, ids=[f"dp{d}-tp{t}-ep{e}" for _, d, t, e in LAYOUTS])
def test_zero_stages_equal_plain_adamw(results, world, dp, tp, ep):
    norms = case_result(results, (dp, tp, ep))
    assert all(n == norms[0] for n in norms)
