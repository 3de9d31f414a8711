"""Judging outputs: agreement of a candidate with a reference, and task accuracy (always a fraction)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolchain.core.errors import GateFailure

PARITY_RTOL = 1e-4


@dataclass(frozen=True)
class Parity:
    """How far a candidate's outputs are from the reference's, over every output. A NaN or Inf in the candidate
    where the reference is finite counts in ``nonfinite`` and makes the errors infinite: never folded away."""

    max_abs: float
    max_rel: float  # max |a - b| / max |b|, per output
    argmax_agreement: float
    samples: int
    nonfinite: int = 0  # candidate values that are NaN or Inf where the reference is finite

    def ok(self, rtol: float = PARITY_RTOL) -> bool:
        return self.nonfinite == 0 and self.max_rel <= rtol and self.argmax_agreement == 1.0

    def problem(self, rtol: float = PARITY_RTOL) -> str:
        """Why ``ok()`` is false, in words ("" when it is true)."""
        if self.nonfinite:
            return f"{self.nonfinite} output value(s) are NaN or Inf where the reference is finite"
        if self.max_rel > rtol:
            return f"max rel error {self.max_rel:.2e} (limit {rtol:.0e})"
        if self.argmax_agreement != 1.0:
            return f"argmax agreement {self.argmax_agreement:.4f}"
        return ""

    def to_json(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "argmax_agreement": self.argmax_agreement,
                "samples": self.samples, "nonfinite": self.nonfinite}


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> Parity:
    """Max abs / relative error and argmax agreement over all outputs (relative to the output's scale).

    Only positions where both are finite enter the error; a NaN/Inf candidate value where the reference is finite
    is counted in ``nonfinite`` and sets both errors to inf (``max(0.0, nan)`` would silently drop it)."""
    if len(ref) != len(got):
        raise GateFailure(f"output count differs: reference {len(ref)}, candidate {len(got)}")
    max_abs = max_rel = 0.0
    agree, n, nonfinite = 1.0, 0, 0
    for r, g in zip(ref, got, strict=True):
        r64: np.ndarray = np.asarray(r, np.float64)
        g64: np.ndarray = np.asarray(g, np.float64).reshape(r64.shape)
        ref_finite = np.isfinite(r64)
        broken = ref_finite & ~np.isfinite(g64)
        nonfinite += int(broken.sum())
        both = ref_finite & ~broken
        if broken.any():
            diff, scale = float("inf"), 1.0
        else:
            diff = float(np.max(np.abs(r64[both] - g64[both]))) if both.any() else 0.0
            scale = float(np.max(np.abs(r64[ref_finite]))) if ref_finite.any() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(scale, 1e-12))
        if r64.ndim >= 2 and r64.shape[-1] > 1:
            rows_r, rows_g = r64.reshape(-1, r64.shape[-1]), g64.reshape(-1, g64.shape[-1])
            a = (rows_r.argmax(-1) == rows_g.argmax(-1)) & ~broken.reshape(rows_r.shape).any(-1)
            agree = min(agree, float(a.mean()))
        n = max(n, r64.shape[0] if r64.ndim else 1)
    return Parity(max_abs, max_rel, agree, n, nonfinite)


def task_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy as a fraction in [0, 1] (every edgec result uses this unit)."""
    return float((np.asarray(logits).argmax(-1) == labels[: len(logits)]).mean())
