"""The per-element op table and the one fast exp the fused KAN kernel and the fast-exp step share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import te

from kernels.tvm.tir._elementwise import BINARY_OPS, UNARY_OPS, apply_op, fast_exp


def _run(fn: Callable[[Any], Any], x: np.ndarray) -> np.ndarray:
    """``fn`` (a scalar TIR expression builder) applied to every element of ``x``, compiled for the host."""
    a = te.placeholder(x.shape, "float32", name="a")
    b = te.compute(x.shape, lambda i: fn(a[i]), name="b")
    lib = tvm.compile(te.create_prim_func([a, b]), target="llvm")
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib(tvm.runtime.tensor(x), out)
    return out.numpy()


def test_fast_exp_is_within_two_ulp() -> None:
    """Cephes expf with a Cody-Waite reduction: measured 8.0e-8 relative at most here (TOPI's fast_exp,
    one rounded ln2 in the reduction, measured 4.1e-6 on the same points)."""
    x = np.concatenate([np.linspace(-87.0, 88.0, 200_001, dtype=np.float32),
                        np.random.default_rng(0).standard_normal(50_000).astype(np.float32) * 4])
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(_run(fast_exp, x) - ref) / ref
    assert float(rel.max()) < 2.4e-7, float(rel.max())  # 2 float32 ulp


def test_op_table_matches_numpy() -> None:
    x = np.random.default_rng(1).uniform(-3, 3, 257).astype(np.float32)
    y = np.float32(0.5)
    want = {"identity": x, "negative": -x, "floor": np.floor(x), "abs": np.abs(x), "square": x * x,
            "sqrt": np.sqrt(np.abs(x)), "exp": np.exp(x), "tanh": np.tanh(x), "sigmoid": 1 / (1 + np.exp(-x)),
            "to_bool": (x != 0).astype(np.float32), "add": x + y, "subtract": x - y, "multiply": x * y,
            "divide": x / y, "maximum": np.maximum(x, y), "minimum": np.minimum(x, y),
            "logical_and": x * y, "logical_or": np.maximum(x, y), "greater": (x > y).astype(np.float32),
            "greater_equal": (x >= y).astype(np.float32), "less": (x < y).astype(np.float32),
            "less_equal": (x <= y).astype(np.float32)}
    assert set(want) == {*UNARY_OPS, *BINARY_OPS}
    for op, ref in want.items():
        if op == "sqrt":
            got = _run(lambda v: apply_op("sqrt", tvm.tirx.abs(v)), x)
        elif op in UNARY_OPS:
            got = _run(lambda v, op=op: apply_op(op, v), x)
        else:
            got = _run(lambda v, op=op: apply_op(op, v, tvm.tirx.const(0.5, "float32")), x)
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6, err_msg=op)
