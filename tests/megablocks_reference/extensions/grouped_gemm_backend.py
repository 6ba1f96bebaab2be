"""Reference CPU implementation of `grouped_gemm_backend`, grouped_gemm 0.3.0's CUDA extension
(csrc/grouped_gemm.cu, the cuBLAS build): `gmm(a, b, c, batch_sizes, trans_a, trans_b)` with
the extension's checks (bf16 only, host-resident int64 batch sizes, contiguous operands) and
its arithmetic (bf16 operands, fp32 accumulation, bf16 result), in plain torch.

Only for tests/megablocks_reference; grouped_gemm's own Python (ops.py: the autograd
function and its backward) runs on top of it unchanged.
"""

import torch


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise RuntimeError(f"grouped_gemm_backend (reference): {what}")


def gmm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, batch_sizes: torch.Tensor,
        trans_a: bool, trans_b: bool) -> None:
    _check(not (trans_a and trans_b), "trans_a and trans_b together")
    _check(batch_sizes.device.type == "cpu" and batch_sizes.dim() == 1 and batch_sizes.dtype == torch.int64,
           f"batch_sizes must be a 1-d int64 host tensor, got {batch_sizes.dtype} on {batch_sizes.device}")
    for name, t in (("a", a), ("b", b), ("c", c)):
        _check(t.dtype == torch.bfloat16, f"{name} is {t.dtype}; only bfloat16 is supported")
        _check(t.is_contiguous(), f"{name} is not contiguous")
    _check(a.dim() == 2, f"a must be 2-d, got {tuple(a.shape)}")
    sizes = batch_sizes.tolist()
    _check(sum(sizes) == a.shape[0], f"batch sizes sum to {sum(sizes)}, a has {a.shape[0]} rows")
    rows_a = torch.split(a, sizes)
    if trans_a:  # c[e] = a_e^T b_e: the weight gradient, b holds rows like a
        _check(b.dim() == 2 and b.shape[0] == a.shape[0] and c.shape == (len(sizes), a.shape[1], b.shape[1]),
               f"trans_a shapes a {tuple(a.shape)} b {tuple(b.shape)} c {tuple(c.shape)}")
        for e, (a_e, b_e) in enumerate(zip(rows_a, torch.split(b, sizes))):
            c[e] = (a_e.float().t() @ b_e.float()).to(c.dtype)
        return
    _check(b.dim() == 3 and b.shape[0] == len(sizes), f"b must be (experts, ., .), got {tuple(b.shape)} for {len(sizes)} batch sizes")
    hidden_in, hidden_out = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
    _check(hidden_in == a.shape[1] and c.shape == (a.shape[0], hidden_out),
           f"shapes a {tuple(a.shape)} b {tuple(b.shape)} (trans_b {trans_b}) c {tuple(c.shape)}")
    start = 0
    for e, a_e in enumerate(rows_a):
        b_e = b[e].t() if trans_b else b[e]
        c[start : start + a_e.shape[0]] = (a_e.float() @ b_e.float()).to(c.dtype)
        start += a_e.shape[0]
