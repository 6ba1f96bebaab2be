"""The megablocks backend against the native one, on any device: the checks themselves.

Run twice over:
- tests/gpu/test_megablocks.py on CUDA, with MegaBlocks and grouped_gemm as built by
  scripts/install_megablocks.sh (skipped without them);
- tests/distributed/test_megablocks_reference.py on CPU in every `make test`: MegaBlocks' and
  grouped_gemm's own Python on reference implementations of their two CUDA extensions, Triton
  kernels in Triton's interpreter (tests/megablocks_reference). That checks our wiring into
  MegaBlocks (attributes, call signatures, weight layout, expert-parallel groups, gradients)
  without a GPU; what it cannot check is the compiled kernels, which is the GPU run's part.

Both backends route with the same TopKRouter (fp32 scores) on the same input, so routing,
the load-balancing loss and the z-loss are identical; only the expert GEMMs (grouped_gemm in
bf16 against torch's grouped_mm) and the combine's rounding order differ. bf16 tolerance: the
largest error within 2e-2 of the reference tensor's largest magnitude for outputs, input
gradients and losses, 3e-2 for weight gradients (a sum over many tokens of bf16 products).
Routing mistakes (a wrong expert, a wrong token, a lost weight) are errors of order 1.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from model.config import ModelConfig, MoEConfig
from model.moe import build_moe
from model.transformer import TransformerLM
from tests.recompute_probe import FeedForwardCalls
from tests.tolerance import BF16, close

PRECISIONS = ("bf16", "fp32", "autocast")


def _pair(dim: int, cfg: MoEConfig, device: str, dtype: torch.dtype = BF16, seed: int = 0):
    """(native, megablocks) layers in `dtype` on `device` holding the same canonical weights."""
    from model.moe.megablocks_backend import MegaBlocksMoE

    torch.manual_seed(seed)
    native = build_moe(dim, cfg)
    for p in native.parameters():
        torch.nn.init.normal_(p, std=0.05)
    mega = build_moe(dim, MoEConfig(**{**vars(cfg), "backend": "megablocks"}))
    assert isinstance(mega, MegaBlocksMoE), type(mega)
    assert mega.state_dict().keys() == native.state_dict().keys()  # nothing but the canonical names
    mega.load_state_dict(native.state_dict())
    return native.to(device, dtype), mega.to(device, dtype)


def layer_equals_native(device: str, num_experts: int, top_k: int, tokens: int,
                        dim: int = 256, hidden: int = 128, precision: str = "bf16") -> None:
    """Output, router losses, a loss built from them, and every gradient. With fewer token-slots
    than experts, the idle experts' weight gradients must be exactly zero.

    precision: "bf16" (a bf16 model, as under ZeRO's bf16), "fp32" (fp32 weights and
    activations: the megablocks backend casts the rows and expert weights to bf16 for
    grouped_gemm and the gradients back), or "autocast" (fp32 weights, bf16 autocast: both
    backends cast the tokens once before dispatch and return bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision ({precision!r}) must be one of {PRECISIONS}")
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=hidden)
    dtype = BF16 if precision == "bf16" else torch.float32
    native, mega = _pair(dim, cfg, device, dtype)
    x = torch.randn(1, tokens, dim, device=device).to(dtype)
    x_n, x_m = x.clone().requires_grad_(), x.clone().requires_grad_()
    autocast = torch.autocast(device, dtype=BF16, enabled=precision == "autocast")
    with autocast:
        y_n, route_n = native(x_n)
    with autocast:
        y_m, route_m = mega(x_m)

    assert y_m.dtype == y_n.dtype == (torch.float32 if precision == "fp32" else BF16), (y_m.dtype, y_n.dtype)
    assert y_m.shape == y_n.shape
    assert torch.equal(route_m.topk_idx_TK, route_n.topk_idx_TK)
    torch.testing.assert_close(route_m.aux_loss, route_n.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(route_m.z_loss, route_n.z_loss, rtol=1e-6, atol=0)
    assert route_m.dropped_slots is None  # dropless, reported like the native backend
    close(y_m, y_n)

    def loss(y, route):
        return y.float().square().mean() + 0.01 * route.aux_loss + 0.001 * route.z_loss

    loss_n, loss_m = loss(y_n, route_n), loss(y_m, route_m)
    close(loss_m, loss_n, what="loss")
    loss_n.backward()
    loss_m.backward()
    close(x_m.grad, x_n.grad, what="input grad")
    close(mega.router.weight.grad, native.router.weight.grad, rel=3e-2, what="router.weight grad")
    idle = route_n.counts_E == 0
    if tokens * top_k < num_experts:
        assert idle.any()
    for name, p_n in native.experts.named_parameters():
        p_m = getattr(mega.experts, name)
        assert p_m.grad.dtype == p_m.dtype == dtype, (name, p_m.grad.dtype, p_m.dtype)
        close(p_m.grad, p_n.grad, rel=3e-2, what=f"experts.{name} grad")
        assert (p_m.grad[idle] == 0).all(), f"experts.{name}: an idle expert has a gradient"


def transformer_equals_native(device: str, dim: int = 256, seq: int = 128, batch: int = 4,
                              recompute: str = "none", shared: int = 0, bias: bool = False) -> None:
    """The whole model: block 0 dense, block 1 MoE (so the MoE input, and with it the routing,
    is the same in both models). Loss, its parts, the expert load and every gradient.
    `recompute`: the megablocks model's train.recompute (the native one keeps its activations);
    `shared`: both models' moe.shared_expert_hidden; `bias`: both routers choose with the same
    random expert bias (moe.bias_update_rate)."""
    model_cfg = ModelConfig(dim=dim, n_layers=2, n_heads=4, ffn_hidden=2 * dim, max_seq_len=seq)
    moe = {"num_experts": 8, "top_k": 2, "expert_hidden": dim, "every_n_layers": 2,
           "shared_expert_hidden": shared, "bias_update_rate": 0.01 if bias else 0.0}
    torch.manual_seed(0)
    native = TransformerLM(model_cfg, MoEConfig(**moe))
    for layer in native.moe_layers() if bias else []:
        layer.router.expert_bias.uniform_(-0.2, 0.2)  # enough to change choices
    mega = TransformerLM(model_cfg, MoEConfig(**moe, backend="megablocks"))
    mega.load_state_dict(native.state_dict())
    mega.set_recompute(recompute)
    calls = FeedForwardCalls(mega)
    native, mega = native.to(device, BF16), mega.to(device, BF16)
    tokens = torch.randint(0, 256, (batch, seq + 1), device=device)
    out_n = native(tokens[:, :-1], tokens[:, 1:])
    out_m = mega(tokens[:, :-1], tokens[:, 1:])

    assert torch.equal(out_m.expert_counts_LE, out_n.expert_counts_LE)
    assert torch.equal(out_m.dropped_slots_L, out_n.dropped_slots_L)
    torch.testing.assert_close(out_m.aux_loss, out_n.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out_m.z_loss, out_n.z_loss, rtol=1e-6, atol=0)
    close(out_m.lm_loss, out_n.lm_loss, what="lm_loss")
    close(out_m.loss, out_n.loss, what="loss")
    out_n.loss.backward()
    out_m.loss.backward()
    calls.expect(recompute)
    grads_m = dict(mega.named_parameters())
    for name, p_n in native.named_parameters():
        close(grads_m[name].grad, p_n.grad, rel=3e-2, what=f"{name} grad")


def weight_layout_matches_grouped_glu(device: str, dim: int = 256, hidden: int = 128,
                                      num_experts: int = 8, top_k: int = 2, tokens: int = 1024) -> None:
    """The mapping in megablocks_backend's docstring, against MegaBlocks' own
    ParallelDroplessMLP with its GroupedGLU on the same routing: the same output, and the
    gradients of MegaBlocks' w1, v1, w2 are ours in that layout. (Input gradients differ by
    design: ours also flow through the router, MegaBlocks' get the routing as data.)"""
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import ParallelDroplessMLP

    D, Fh, E, K, T = dim, hidden, num_experts, top_k, tokens
    torch.manual_seed(0)
    ours = build_moe(D, MoEConfig(num_experts=E, top_k=K, expert_hidden=Fh, backend="megablocks"))
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ours = ours.to(device, BF16)
    args = Arguments(hidden_size=D, ffn_hidden_size=Fh, moe_num_experts=E, moe_top_k=K,
                     mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu, bias=False,
                     return_bias=False, fp16=False, bf16=True, moe_loss_weight=0.0,
                     device=torch.device(device))
    theirs = ParallelDroplessMLP(args)
    ex = ours.experts
    with torch.no_grad():
        theirs.mlp.w1.copy_(ex.w1_EDF.transpose(1, 2).reshape(E * Fh, D))
        theirs.mlp.v1.copy_(ex.w3_EDF.transpose(1, 2).reshape(E * Fh, D))
        theirs.mlp.w2.copy_(ex.w2_EFD.reshape(E * Fh, D))

    x = torch.randn(T, D, device=device).to(BF16)
    y_o, route = ours(x.view(1, T, D))
    y_t = theirs(x, None, route.topk_weight_TK.detach(), route.topk_idx_TK)  # scores unused
    close(y_o.view(T, D), y_t, rel=1e-2)
    g = torch.randn(T, D, device=device).to(BF16)
    y_o.view(T, D).backward(g)
    y_t.backward(g)
    close(ex.w1_EDF.grad.transpose(1, 2).reshape(E * Fh, D), theirs.mlp.w1.grad, what="w1 grad")
    close(ex.w3_EDF.grad.transpose(1, 2).reshape(E * Fh, D), theirs.mlp.v1.grad, what="v1 grad")
    close(ex.w2_EFD.grad.reshape(E * Fh, D), theirs.mlp.w2.grad, what="w2 grad")


def ep_equals_ep1(rank: int, world: int, ep: int, device: str, hot_expert: int | None,
                  tokens: int = 512, dim: int = 256, hidden: int = 128, num_experts: int = 8) -> list[int]:
    """One rank of `world`: the megablocks layer at expert parallelism `ep` (MegaBlocks'
    parallel_forward_once, its all-to-alls over our ep group) against the same layer unsharded
    at ep 1 on this rank's own tokens. With `hot_expert`, every token picks that one expert:
    the other ranks of its ep group receive no rows at all, and still run every collective and
    get a (zero) gradient. Returns this rank's expert counts."""
    import torch.distributed as dist

    from parallel.collectives import ProcessGroupExpertComm
    from parallel.topology import Layout, Topology

    topo = Topology.create(Layout(world_size=world, dp=world, ep=ep))
    cfg = MoEConfig(num_experts=num_experts, top_k=1 if hot_expert is not None else 2,
                    expert_hidden=hidden, backend="megablocks")
    torch.manual_seed(0)
    ref = build_moe(dim, cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    if hot_expert is not None:
        with torch.no_grad():
            ref.router.weight.zero_()
            ref.router.weight[hot_expert] = 1.0
    ref = ref.to(device, BF16)
    layer = copy.deepcopy(ref)
    layer.experts.shard_(topo.coord("ep"), ep)
    layer.set_expert_parallel(ProcessGroupExpertComm(topo.groups["ep"]))

    torch.manual_seed(100 + rank)  # different tokens on each rank
    x = torch.randn(1, tokens, dim, device=device)
    x = (x.abs() if hot_expert is not None else x).to(BF16)
    g = torch.randn_like(x)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, _ = ref(x_ref)
    y_ep, route = layer(x_ep)
    close(y_ep, y_ref)
    y_ref.backward(g)
    y_ep.backward(g)
    close(x_ep.grad, x_ref.grad, what="input grad")
    close(layer.router.weight.grad, ref.router.weight.grad, rel=3e-2, what="router grad")
    lo, n = layer.experts.expert_offset, layer.experts.num_local_experts
    for name, p in layer.experts.named_parameters():
        # The owner's gradient holds the contributions of its ep group's tokens (unscaled).
        want = getattr(ref.experts, name).grad.float()
        dist.all_reduce(want, group=topo.groups["ep"])
        assert p.grad is not None, f"{name} has no gradient on rank {rank}"
        close(p.grad, want[lo : lo + n], rel=3e-2, what=f"experts.{name} grad")
    return route.counts_E.tolist()
