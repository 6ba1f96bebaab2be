"""The reduced-precision comparison the tests share: the largest error within `rel` of the
reference tensor's largest magnitude. bf16 keeps 8 bits of mantissa, so a bf16 result is
compared to its fp32 (or other-backend) reference this way; each test states its `rel`.
Routing mistakes (a wrong expert, a wrong token, a lost weight) are errors of order 1."""

from __future__ import annotations

import torch

BF16 = torch.bfloat16


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-2, what: str = "output") -> None:
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel} x {scale:.3e}"
