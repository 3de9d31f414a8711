"""bfloat16 weight storage shared by the kernels: which float32 weights bf16 holds exactly, and the constant.

bf16 is the upper half of an fp32, so a float32 weight whose lower 16 bits are all zero (what the bf16
graph pass leaves after TVM folds its Cast) is stored as bf16 with no loss: half the bytes, widened to
fp32 in registers by a zero extension and a shift (any CPU; no avx512_bf16 needed).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_bf16_bits(w: np.ndarray) -> np.ndarray | None:
    """The upper 16 bits of the float32 ``w`` as uint16 when ``w`` is exactly representable in bfloat16
    (every lower half zero), else None: storing such a weight as bf16 loses nothing."""
    if w.dtype != np.float32 or w.size == 0:
        return None
    bits = np.ascontiguousarray(w).view(np.uint32)
    if np.any(bits & 0xFFFF):
        return None
    return (bits >> 16).astype(np.uint16)


def bf16_constant_array(bits: np.ndarray) -> Any:
    """A numpy array TVM takes as a bfloat16 constant, from the raw uint16 bits."""
    import ml_dtypes  # a dependency of TVM's Python package

    return bits.view(ml_dtypes.bfloat16)


def widened(load: Any, dtype: str) -> Any:
    """A weight load as float32: cast when the weight buffer is stored in ``dtype`` bfloat16."""
    from tvm.tirx import Cast

    return load if dtype == "float32" else Cast("float32", load)


__all__ = ["bf16_constant_array", "to_bf16_bits", "widened"]
