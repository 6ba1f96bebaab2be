"""moe.backend megablocks on CUDA: equal to the native backend on the same canonical weights.

Skipped without CUDA, or without MegaBlocks (scripts/install_megablocks.sh installs it).

Both backends route with the same TopKRouter (fp32 scores) on the same input, so routing,
the load-balancing loss and the z-loss are identical; only the expert GEMMs (grouped_gemm
against torch's grouped_mm) and the combine's rounding order differ. bf16 tolerance as in
test_native_cuda.py: the largest error within 2e-2 of the reference tensor's largest
magnitude for outputs, input gradients and losses, 3e-2 for weight gradients (a sum over
many tokens of bf16 products).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig, MoEConfig
from model.moe import build_moe
from model.transformer import TransformerLM


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    from model.moe.megablocks_backend import import_megablocks

    try:
        import_megablocks()
    except ImportError as exc:
        return str(exc)
    return None


UNAVAILABLE = _unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))]
BF16 = torch.bfloat16


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-2, what: str = "output") -> None:
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel} x {scale:.3e}"


def _pair(dim: int, cfg: MoEConfig, seed: int = 0):
    """(native, megablocks) layers in bf16 on the GPU holding the same canonical weights."""
    torch.manual_seed(seed)
    native = build_moe(dim, cfg)
    for p in native.parameters():
        torch.nn.init.normal_(p, std=0.05)
    mega = build_moe(dim, MoEConfig(**{**vars(cfg), "backend": "megablocks"}))
    assert mega.state_dict().keys() == native.state_dict().keys()  # nothing but the canonical names
    mega.load_state_dict(native.state_dict())
    return native.cuda().to(BF16), mega.cuda().to(BF16)


@pytest.mark.parametrize("num_experts, top_k, tokens", [(8, 2, 2048), (64, 8, 1024), (64, 1, 16)])
def test_layer_equals_native_bf16(num_experts, top_k, tokens):
    """Output, router losses, a loss built from them, and every gradient. (64, 1, 16) leaves
    most experts without a token: their weight gradients must be exactly zero."""
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=128)
    native, mega = _pair(256, cfg)
    x = torch.randn(1, tokens, 256, device="cuda").to(BF16)
    x_n, x_m = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_n, route_n = native(x_n)
    y_m, route_m = mega(x_m)

    assert y_m.dtype == BF16 and y_m.shape == y_n.shape
    assert torch.equal(route_m.topk_idx_TK, route_n.topk_idx_TK)
    torch.testing.assert_close(route_m.aux_loss, route_n.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(route_m.z_loss, route_n.z_loss, rtol=1e-6, atol=0)
    assert route_m.dropped_slots is None  # dropless, reported like the native backend
    _close(y_m, y_n)

    def loss(y, route):
        return y.float().square().mean() + 0.01 * route.aux_loss + 0.001 * route.z_loss

    loss_n, loss_m = loss(y_n, route_n), loss(y_m, route_m)
    _close(loss_m, loss_n, what="loss")
    loss_n.backward()
    loss_m.backward()
    _close(x_m.grad, x_n.grad, what="input grad")
    _close(mega.router.weight.grad, native.router.weight.grad, rel=3e-2, what="router.weight grad")
    idle = route_n.counts_E == 0
    if tokens * top_k < num_experts:
        assert idle.any()
    for name, p_n in native.experts.named_parameters():
        p_m = getattr(mega.experts, name)
        _close(p_m.grad, p_n.grad, rel=3e-2, what=f"experts.{name} grad")
        assert (p_m.grad[idle] == 0).all(), f"experts.{name}: an idle expert has a gradient"


def test_transformer_loss_and_gradients_equal_native_bf16():
    """The whole model: block 0 dense, block 1 MoE (so the MoE input, and with it the routing,
    is the same in both models). Loss, its parts, the expert load and every gradient."""
    model_cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, ffn_hidden=512, max_seq_len=128)
    moe = {"num_experts": 8, "top_k": 2, "expert_hidden": 256, "every_n_layers": 2}
    torch.manual_seed(0)
    native = TransformerLM(model_cfg, MoEConfig(**moe))
    mega = TransformerLM(model_cfg, MoEConfig(**moe, backend="megablocks"))
    mega.load_state_dict(native.state_dict())
    native, mega = native.cuda().to(BF16), mega.cuda().to(BF16)
    tokens = torch.randint(0, 256, (4, 129), device="cuda")
    out_n = native(tokens[:, :-1], tokens[:, 1:])
    out_m = mega(tokens[:, :-1], tokens[:, 1:])

    assert torch.equal(out_m.expert_counts_LE, out_n.expert_counts_LE)
    assert torch.equal(out_m.dropped_slots_L, out_n.dropped_slots_L)
    torch.testing.assert_close(out_m.aux_loss, out_n.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out_m.z_loss, out_n.z_loss, rtol=1e-6, atol=0)
    _close(out_m.lm_loss, out_n.lm_loss, what="lm_loss")
    _close(out_m.loss, out_n.loss, what="loss")
    out_n.loss.backward()
    out_m.loss.backward()
    grads_m = dict(mega.named_parameters())
    for name, p_n in native.named_parameters():
        _close(grads_m[name].grad, p_n.grad, rel=3e-2, what=f"{name} grad")


def test_documented_weight_layout_matches_megablocks_own_grouped_glu():
    """The mapping in megablocks_backend's docstring, against MegaBlocks' own
    ParallelDroplessMLP with its GroupedGLU on the same routing: the same output, and the
    gradients of MegaBlocks' w1, v1, w2 are ours in that layout. (Input gradients differ by
    design: ours also flow through the router, MegaBlocks' get the routing as data.)"""
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import ParallelDroplessMLP

    D, Fh, E, K, T = 256, 128, 8, 2, 1024
    torch.manual_seed(0)
    ours = build_moe(D, MoEConfig(num_experts=E, top_k=K, expert_hidden=Fh, backend="megablocks"))
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ours = ours.cuda().to(BF16)
    args = Arguments(hidden_size=D, ffn_hidden_size=Fh, moe_num_experts=E, moe_top_k=K,
                     mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu, bias=False,
                     return_bias=False, fp16=False, bf16=True, moe_loss_weight=0.0,
                     device=torch.cuda.current_device())
    theirs = ParallelDroplessMLP(args)
    ex = ours.experts
    with torch.no_grad():
        theirs.mlp.w1.copy_(ex.w1_EDF.transpose(1, 2).reshape(E * Fh, D))
        theirs.mlp.v1.copy_(ex.w3_EDF.transpose(1, 2).reshape(E * Fh, D))
        theirs.mlp.w2.copy_(ex.w2_EFD.reshape(E * Fh, D))

    x = torch.randn(T, D, device="cuda").to(BF16)
    y_o, route = ours(x.view(1, T, D))
    y_t = theirs(x, None, route.topk_weight_TK.detach(), route.topk_idx_TK)  # scores unused
    _close(y_o.view(T, D), y_t, rel=1e-2)
    g = torch.randn(T, D, device="cuda").to(BF16)
    y_o.view(T, D).backward(g)
    y_t.backward(g)
    _close(ex.w1_EDF.grad.transpose(1, 2).reshape(E * Fh, D), theirs.mlp.w1.grad, what="w1 grad")
    _close(ex.w3_EDF.grad.transpose(1, 2).reshape(E * Fh, D), theirs.mlp.v1.grad, what="v1 grad")
    _close(ex.w2_EFD.grad.reshape(E * Fh, D), theirs.mlp.w2.grad, what="w2 grad")


def _ep2_equals_ep1(rank, world, hot_expert):
    """One rank of two on the same GPU, MegaBlocks' all-to-alls over a gloo ep group (gloo
    moves CUDA tensors through host memory; training itself uses NCCL, one GPU per rank)."""
    import torch.distributed as dist

    from parallel.collectives import ProcessGroupExpertComm
    from parallel.topology import Layout, Topology

    torch.cuda.set_device(0)
    topo = Topology.create(Layout(world_size=world, dp=world, ep=world))
    cfg = MoEConfig(num_experts=8, top_k=1 if hot_expert is not None else 2, expert_hidden=128,
                    backend="megablocks")
    torch.manual_seed(0)
    ref = build_moe(256, cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    if hot_expert is not None:  # every token picks one expert: the other rank receives nothing
        with torch.no_grad():
            ref.router.weight.zero_()
            ref.router.weight[hot_expert] = 1.0
    ref = ref.cuda().to(BF16)
    layer = copy.deepcopy(ref)
    layer.experts.shard_(rank, world)
    layer.set_expert_parallel(ProcessGroupExpertComm(topo.groups["ep"]))

    torch.manual_seed(100 + rank)  # different tokens on each rank
    x = torch.randn(1, 512, 256, device="cuda")
    x = (x.abs() if hot_expert is not None else x).to(BF16)
    g = torch.randn_like(x)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, _ = ref(x_ref)
    y_ep, route = layer(x_ep)
    _close(y_ep, y_ref)
    y_ref.backward(g)
    y_ep.backward(g)
    _close(x_ep.grad, x_ref.grad, what="input grad")
    _close(layer.router.weight.grad, ref.router.weight.grad, rel=3e-2, what="router grad")
    lo, n = layer.experts.expert_offset, layer.experts.num_local_experts
    for name, p in layer.experts.named_parameters():
        # The owner's gradient holds the contributions of both ranks' tokens (unscaled).
        want = getattr(ref.experts, name).grad.float()
        dist.all_reduce(want, group=topo.groups["ep"])
        assert p.grad is not None, f"{name} has no gradient on rank {rank}"
        _close(p.grad, want[lo : lo + n], rel=3e-2, what=f"experts.{name} grad")
    return route.counts_E.tolist()


@pytest.mark.parametrize("hot_expert", [None, 5])
def test_ep2_equals_ep1_on_one_gpu(hot_expert):
    """ep 2 against ep 1 on each rank's own tokens; with hot_expert 5 (owned by rank 1) rank 0
    receives no rows at all, and still runs every collective and gets a (zero) gradient."""
    from tests.distributed.spawn import run_distributed

    counts = run_distributed(_ep2_equals_ep1, world_size=2, args=(hot_expert,), timeout_s=300)
    if hot_expert is not None:
        assert all(c == [0] * hot_expert + [512] + [0] * (7 - hot_expert) for c in counts)
