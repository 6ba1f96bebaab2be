"""moe.backend megablocks on CPU, through MegaBlocks' own Python on reference kernels.

The checks are tests/megablocks_checks.py's, the same that tests/gpu/test_megablocks.py runs
on CUDA with the compiled kernels; the environment is tests/megablocks_reference (what is
MegaBlocks' own code there and what is a reference implementation). Shapes are small: the
Triton interpreter runs each kernel program in Python (a few ms per row).

Each check runs in spawned processes (activate() switches Triton to its interpreter for the
whole process). Without the prepared environment the tests skip, saying how to prepare it;
under CI=true they fail instead, since `make test` prepares it.
"""

import os

import pytest

from tests import megablocks_checks as checks
from tests import megablocks_reference as reference
from tests.distributed.spawn import run_distributed

pytestmark = pytest.mark.distributed
SHAPE = dict(dim=64, hidden=32)
TOKENS_PER_RANK = 12


@pytest.fixture(autouse=True)
def _prepared():
    reason = reference.unavailable()
    if reason and os.environ.get("CI") == "true":
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


def _single_process_checks(rank, world):
    reference.activate()
    # (16, 1, 4): 4 token-slots for 16 experts, so most experts are idle (zero gradients).
    for num_experts, top_k, tokens in [(8, 2, 24), (16, 4, 8), (16, 1, 4)]:
        checks.layer_equals_native("cpu", num_experts, top_k, tokens, **SHAPE)
    for precision in ("fp32", "autocast"):  # fp32 weights: cast to bf16 for the GEMMs and back
        checks.layer_equals_native("cpu", 8, 2, 24, **SHAPE, precision=precision)
    for recompute, more in (("none", False), ("full", True)):  # with a shared expert and a bias
        checks.transformer_equals_native("cpu", dim=64, seq=8, batch=2, recompute=recompute,
                                         shared=96 if more else 0, bias=more)
    checks.weight_layout_matches_grouped_glu("cpu", tokens=24, **SHAPE)


def test_layer_model_and_weight_layout_equal_native():
    """ep 1: grouped_forward_once against the native layer (three shapes in bf16, and fp32
    weights with and without autocast), the whole model (also recomputing its blocks in
    backward, with a shared expert and the routers' expert bias), and the documented weight
    mapping against MegaBlocks' own GroupedGLU."""
    run_distributed(_single_process_checks, world_size=1, timeout_s=240)


def _ep_ranks(rank, world):
    reference.activate()
    # ep 2 of 4 ranks: two ep groups, so MegaBlocks must use ours, not the world.
    checks.ep_equals_ep1(rank, world, 2, "cpu", None, tokens=TOKENS_PER_RANK, **SHAPE)
    # ep 4, every token on expert 5 (owned by rank 2): ranks 0, 1 and 3 receive no rows.
    return checks.ep_equals_ep1(rank, world, 4, "cpu", 5, tokens=TOKENS_PER_RANK, **SHAPE)


def test_ep_equals_ep1_in_subgroups_and_with_idle_ranks():
    """parallel_forward_once over our gloo ep groups against ep 1 on each rank's own tokens."""
    counts = run_distributed(_ep_ranks, world_size=4, timeout_s=240)
    assert all(c == [0] * 5 + [TOKENS_PER_RANK] + [0] * 2 for c in counts)
