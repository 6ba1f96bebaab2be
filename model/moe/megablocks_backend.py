"""moe.backend = megablocks: MegaBlocks' dropless (dMoE) kernels on our router and weights.

The four stages, and whose code runs each (MegaBlocks 0.10.0, `ParallelDroplessMLP`'s grouped
path, i.e. `mlp_impl="grouped"`; its `sparse` path refuses Triton >= 3.2):
  route    our TopKRouter: fp32 scores, softmax, top-k, renormalisation, the load-balancing
           and z losses. So RouterOutput is exactly the native backend's; dropless, so
           dropped_slots stays None.
  dispatch MegaBlocks: CUDA radix sort and histogram of the expert ids, inclusive cumsum, its
           Triton gather (rows grouped by expert, no padding). At ep > 1 its
           `parallel_forward_once`: all_to_all_single of the per-expert counts, then of the
           rows with uneven splits, over OUR expert-parallel group (comm.group), then a local
           regroup by expert (replicate + sort).
  compute  grouped_gemm's `gmm` on our stacked weights (_CanonicalGLU, below).
  combine  MegaBlocks: the inverse all-to-all, then its Triton scatter, which multiplies each
           slot by its router weight in fp32, rounds to the activations' dtype, and sums each
           token's K slots.

Weight layout. MegaBlocks' own GroupedGLU keeps w1 (gate), v1 (up) and w2 (down) as
(El*F, D) matrices viewed as (El, F, D), and computes (silu(x w1^T) * (x v1^T)) w2. The
canonical tensors are the same numbers in this layout:
    MegaBlocks w1 = w1_EDF.transpose(1, 2).reshape(El * F, D)
    MegaBlocks v1 = w3_EDF.transpose(1, 2).reshape(El * F, D)
    MegaBlocks w2 = w2_EFD.reshape(El * F, D)
No second copy is kept: _CanonicalGLU hands w1_EDF and w3_EDF to grouped_gemm as they are
(trans_b=False, where GroupedGLU passes its transposed copy with trans_b=True) and w2_EFD as
it is. Gradients land on the canonical parameters, checkpoints move between backends
unchanged, and expert parallelism shards the same tensors (this rank keeps global experts
[offset, offset + El), which is also the slice MegaBlocks assigns to ep rank r).

What differs from MegaBlocks' own dMoE, on purpose:
- Its LearnedRouter (own weight, scores in the activations' dtype) and its module-global
  side channels for the aux losses (`_LOAD_BALANCING_LOSS`, `_ROUTER_LOGITS`) are not used.
- Its expert MLPs scale expert gradients by 1/ep; ours are not scaled: parallel/ reduces
  expert gradients over the expert-data-parallel group exactly as for the native backend.
- grouped_gemm computes in bf16 only. A bf16 model (ZeRO with bf16) runs as it is. With fp32
  weights (train.precision fp32, or autocast's fp32 weights) the rows and local expert weights
  are cast to bf16 for the GEMMs (one copy of the weights per forward) and the result is cast
  back; autograd casts the gradients to fp32.

Host synchronisations: grouped_gemm takes the per-expert row counts on the host, one copy per
layer and forward at ep 1; at ep > 1 MegaBlocks copies the exchanged counts to the host once
(for the all-to-all splits) and reuses them for the GEMMs.

Shape legend: T tokens, K choices per token, N rows (token-slots) grouped by local expert,
D model dim, F expert hidden, El local experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from model.config import MoEConfig
from model.moe.dispatch import ExpertComm
from model.moe.layer import MoELayer, to_autocast_dtype
from model.moe.router import RouterOutput

INSTALL_SCRIPT = "scripts/install_megablocks.sh"
MEGABLOCKS_VERSION = "0.10.0"


def import_megablocks() -> SimpleNamespace:
    """MegaBlocks' grouped dropless path and grouped_gemm, or ImportError saying how to install.

    The only place MegaBlocks is imported (also called by the launcher's config check).
    The version is pinned because the backend relies on ParallelDroplessMLP's internals.
    """
    try:  # torch is imported already (this module's top), as megablocks_ops needs libc10
        import grouped_gemm
        import megablocks_ops  # noqa: F401  (MegaBlocks' CUDA extension; absent if not built)
        from megablocks._version import __version__ as version
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import ParallelDroplessMLP
    except (ImportError, OSError) as exc:
        raise ImportError(
            f"MegaBlocks {MEGABLOCKS_VERSION} with its CUDA ops, grouped_gemm and stanford-stk "
            f"are not importable ({type(exc).__name__}: {exc}); install them against this "
            f"torch with {INSTALL_SCRIPT}"
        ) from exc
    if version != MEGABLOCKS_VERSION:
        raise ImportError(
            f"MegaBlocks {version} is installed; this backend uses ParallelDroplessMLP's "
            f"internals as of {MEGABLOCKS_VERSION}: install that with {INSTALL_SCRIPT}"
        )
    return SimpleNamespace(Arguments=Arguments, ParallelDroplessMLP=ParallelDroplessMLP,
                           gmm=grouped_gemm.ops.gmm)


def why_unavailable(device: torch.device) -> str | None:
    """Why the megablocks backend cannot run on `device` here, in a line; None if it can."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "megablocks needs CUDA"
    try:
        import_megablocks()
    except ImportError as exc:
        return str(exc).split(";")[0]
    return None


class _CanonicalGLU:
    """Stands in for MegaBlocks' GroupedGLU (`ParallelDroplessMLP.mlp`): SwiGLU experts on
    our stacked weights, read at every call (so sharding and `.to()` are always seen)."""

    def __init__(self, experts: nn.Module, gmm: Callable):
        self.experts = experts  # a reference; the MoE layer owns the module
        self.gmm = gmm

    def __call__(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # Host synchronisation at ep 1 (at ep > 1 the counts arrive on the host already):
        # grouped_gemm's cuBLAS path needs the row counts as a CPU int64 tensor.
        batch_sizes_E = tokens_per_expert.to("cpu", torch.int64)
        ex, bf16 = self.experts, torch.bfloat16  # grouped_gemm's only dtype
        x = x_ND.to(bf16)
        w1_EDF, w3_EDF, w2_EFD = (w.to(bf16).contiguous() for w in (ex.w1_EDF, ex.w3_EDF, ex.w2_EFD))
        h_NF = F.silu(self.gmm(x, w1_EDF, batch_sizes_E)) * self.gmm(x, w3_EDF, batch_sizes_E)
        return self.gmm(h_NF, w2_EFD, batch_sizes_E).to(x_ND.dtype)


def _dropless_pipeline(mb: SimpleNamespace, dim: int, cfg: MoEConfig, experts: nn.Module,
                       group=None) -> nn.Module:
    """A ParallelDroplessMLP whose `mlp` is _CanonicalGLU, built without its __init__.

    Its __init__ allocates MegaBlocks' own expert weights (a dense MLP's and the GLU's) and
    sizes the sparse path's transpose sort with log2(E * F / 128), which overflows for
    E * F < 128. The grouped path (grouped_forward_once at ep 1, parallel_forward_once at
    ep > 1) reads only the attributes set here: run on CPU against MegaBlocks 0.10.0 in every
    `make test` (tests/distributed/test_megablocks_reference.py).
    """
    args = mb.Arguments(
        hidden_size=dim, ffn_hidden_size=cfg.expert_hidden, moe_num_experts=cfg.num_experts,
        moe_top_k=cfg.top_k, mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu,
        bias=False, return_bias=False, fp16=False, bf16=True,
        moe_loss_weight=0.0,  # the aux loss is ours (RouterOutput), never MegaBlocks' global list
        moe_expert_model_parallelism=group is not None, expert_parallel_group=group,
        device=torch.device("meta"),  # read only by the skipped __init__s; nothing is allocated
    )
    pipeline = mb.ParallelDroplessMLP.__new__(mb.ParallelDroplessMLP)
    nn.Module.__init__(pipeline)
    pipeline.args = args
    pipeline.num_experts = cfg.num_experts
    pipeline.top_k = cfg.top_k
    pipeline.sort_end_bit = max(math.ceil(math.log2(cfg.num_experts)), 1)  # radix-sort bits of an expert id
    pipeline.mlp = _CanonicalGLU(experts, mb.gmm)
    return pipeline


class MegaBlocksMoE(MoELayer):
    """The megablocks backend: CUDA only, tensor parallelism 1 (both checked at config time)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__(dim, cfg)
        self._mb = import_megablocks()
        self._dim, self._cfg = dim, cfg
        self._ep_size = 1
        self._set_pipeline(None)

    def _set_pipeline(self, group) -> None:
        # Kept out of the module tree (holds no parameters; `experts` is ours), so the state
        # dict and the parameter list are exactly the canonical ones.
        object.__setattr__(self, "_pipeline",
                           _dropless_pipeline(self._mb, self._dim, self._cfg, self.experts, group))

    def set_expert_parallel(self, comm: ExpertComm) -> None:
        self._ep_size = comm.size
        if comm.size == 1:
            self._set_pipeline(None)
            return
        group = getattr(comm, "group", None)
        if group is None:
            raise TypeError(
                f"moe.backend megablocks at ep {comm.size} needs a process-group communicator "
                f"(parallel.collectives.ProcessGroupExpertComm), got {type(comm).__name__}"
            )
        self._set_pipeline(group)  # MegaBlocks runs its all-to-alls on our ep group

    def routed(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1]).contiguous()
        route = self.router(x_TD)
        run = (self._pipeline.parallel_forward_once if self._ep_size > 1
               else self._pipeline.grouped_forward_once)
        # Combine weights go in fp32 and MegaBlocks' scatter multiplies in fp32; under CUDA
        # autocast its ops (stk's custom_fwd) first round them to bf16, as the native combine does.
        y_TD, _ = run(to_autocast_dtype(x_TD), route.topk_weight_TK, route.topk_idx_TK)
        return y_TD.view_as(x_BSD), route
