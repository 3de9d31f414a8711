"""Judging outputs: agreement of a candidate with a reference, and task accuracy (always a fraction)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolchain.core.errors import GateFailure

PARITY_RTOL = 1e-4


@dataclass(frozen=True)
class Parity:
    """How far a candidate's outputs are from the reference's, over every output."""

    max_abs: float
    max_rel: float  # max |a - b| / max |b|, per output
    argmax_agreement: float
    samples: int

    def ok(self, rtol: float = PARITY_RTOL) -> bool:
        return self.max_rel <= rtol and self.argmax_agreement == 1.0

    def to_json(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel,
                "argmax_agreement": self.argmax_agreement, "samples": self.samples}


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> Parity:
    """Max abs / relative error and argmax agreement over all outputs (relative to the output's scale)."""
    if len(ref) != len(got):
        raise GateFailure(f"output count differs: reference {len(ref)}, candidate {len(got)}")
    max_abs = max_rel = 0.0
    agree, n = 1.0, 0
    for r, g in zip(ref, got, strict=True):
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64).reshape(np.shape(r))
        diff = float(np.max(np.abs(r64 - g64))) if r64.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(np.max(np.abs(r64))) if r64.size else 0.0, 1e-12))
        if r64.ndim >= 2 and r64.shape[-1] > 1:
            a = (r64.reshape(-1, r64.shape[-1]).argmax(-1) == g64.reshape(-1, g64.shape[-1]).argmax(-1))
            agree = min(agree, float(a.mean()))
        n = max(n, r64.shape[0] if r64.ndim else 1)
    return Parity(max_abs, max_rel, agree, n)


def task_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy as a fraction in [0, 1] (every edgec result uses this unit)."""
    return float((np.asarray(logits).argmax(-1) == labels[: len(logits)]).mean())
