"""moe.backend megablocks on CUDA: equal to the native backend on the same canonical weights.

Skipped without CUDA, or without MegaBlocks (scripts/install_megablocks.sh installs it).
The checks and their tolerances are in tests/megablocks_checks.py; every `make test` runs
them on CPU too, on reference kernels (tests/distributed/test_megablocks_reference.py). Here
they run at larger shapes on the compiled kernels.
"""

import pytest
import torch

from tests import megablocks_checks as checks


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


@pytest.mark.parametrize("num_experts, top_k, tokens", [(8, 2, 2048), (64, 8, 1024), (64, 1, 16)])
def test_layer_equals_native_bf16(num_experts, top_k, tokens):
    """(64, 1, 16) leaves most experts without a token: their weight gradients must be zero."""
    checks.layer_equals_native("cuda", num_experts, top_k, tokens)


@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_layer_with_fp32_weights_equals_native(precision):
    """fp32 weights (train.precision fp32, or autocast's): grouped_gemm still computes in bf16."""
    checks.layer_equals_native("cuda", 8, 2, 2048, precision=precision)


@pytest.mark.parametrize("recompute, more", [("none", False), ("full", True)])
def test_transformer_loss_and_gradients_equal_native_bf16(recompute, more):
    """`more`: with a shared expert and the routers' expert bias."""
    checks.transformer_equals_native("cuda", recompute=recompute, shared=512 if more else 0, bias=more)


def test_documented_weight_layout_matches_megablocks_own_grouped_glu():
    checks.weight_layout_matches_grouped_glu("cuda")


def _ep2_rank(rank, world, hot_expert):
    """One rank of two on the same GPU, MegaBlocks' all-to-alls over a gloo ep group (gloo
    moves CUDA tensors through host memory; training itself uses NCCL, one GPU per rank)."""
    torch.cuda.set_device(0)
    return checks.ep_equals_ep1(rank, world, 2, "cuda", hot_expert)


@pytest.mark.parametrize("hot_expert", [None, 5])
def test_ep2_equals_ep1_on_one_gpu(hot_expert):
    """With hot_expert 5 (owned by rank 1) rank 0 receives no rows at all."""
    from tests.distributed.spawn import run_distributed

    counts = run_distributed(_ep2_rank, world_size=2, args=(hot_expert,), timeout_s=300)
    if hot_expert is not None:
        assert all(c == [0] * hot_expert + [512] + [0] * (7 - hot_expert) for c in counts)
