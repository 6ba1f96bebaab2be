"""The entries of the activations inventory (planner/activations.py) and the pieces several
blocks share: a norm, the inputs linears keep, a dense SwiGLU.

Shape letters as in planner/activations.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.shapes import FP32, Shapes

@dataclass(frozen=True)
class Saved:
    what: str
    nbytes: float


def sum_bytes(items: list[Saved]) -> float:
    return sum(i.nbytes for i in items)


def rms_norm(s: Shapes, rows: float, width: int, in_bytes: int, what: str) -> list[Saved]:
    """model.layers.rms_norm of `rows` x `width` elements of `in_bytes` each."""
    if s.device == "cuda":
        return [Saved(f"{what}: input", rows * width * in_bytes),
                Saved(f"{what}: 1/rms (fp32)", rows * FP32)]
    # The CPU composite computes in fp32: it keeps the fp32 upcast of the input (the input
    # itself when fp32), 1/rms and the normalised input before the gain, both fp32.
    return [Saved(f"{what}: input (fp32)", rows * width * FP32),
            Saved(f"{what}: 1/rms (fp32)", rows * FP32),
            Saved(f"{what}: normalised input (fp32)", rows * width * FP32)]


def linear_inputs(s: Shapes, rows: float, width: int, weights: list[int], what: str,
                  in_bytes: int) -> list[Saved]:
    """What the linears reading one `rows` x `width` input keep of it. Their input is counted
    once, unless autocast makes a bf16 copy for each of them (an fp32 input), with a bf16 copy of
    each weight (`weights`: their element counts)."""
    if s.precision.autocast and in_bytes == FP32:
        return ([Saved(f"{what}: bf16 copy of the input, linear {i + 1}", rows * width * 2)
                 for i in range(len(weights))]
                + [Saved(f"{what}: bf16 copy of weight {i + 1}", n * 2) for i, n in enumerate(weights)])
    copies = [Saved(f"{what}: bf16 weight copy {i + 1}", n * 2) for i, n in enumerate(weights)
              ] if s.precision.autocast else []
    return [Saved(f"{what}: input", rows * width * in_bytes)] + copies


def swiglu(s: Shapes, hidden: int, what: str, in_shared_with: str | None) -> list[Saved]:
    """A dense SwiGLU (model.layers.SwiGLU) on this rank's `hidden` units: its input (unless
    `in_shared_with` keeps it already), w1's output, silu's output, w3's output, w2's input."""
    p, T, D = s.precision, s.tokens, s.job.model.dim
    kept = linear_inputs(s, T, D, [D * hidden, D * hidden], f"{what} w1/w3", p.residual)
    if in_shared_with is not None and not p.autocast:
        kept = []  # the same storage as the router's input
    kept += [Saved(f"{what}: {n}", T * hidden * p.compute)
             for n in ("w1 output (silu's input)", "silu output", "w3 output", "w2 input")]
    if p.autocast:
        kept.append(Saved(f"{what}: w2 bf16 weight copy", hidden * D * 2))
    return kept
