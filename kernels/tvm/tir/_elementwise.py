"""What the fused kernels' per-element interpreters share: the graph node, the op table, one fast exp.

The fused KAN and LIF kernels both evaluate a small per-element graph read off the Relax IR (a basis
expansion, a membrane recurrence) as TIR expressions, one lane per element. ``Node`` is that graph's node,
``apply_op`` the one table from op name to TIR expression, ``fast_exp`` the vectorizable exp behind both
the fused KAN kernel and the ``fast-exp`` pipeline step.

``fast_exp`` is Cephes' ``expf``: x = n ln2 + r with n = round(x / ln2), the reduction done Cody-Waite
style (ln2 split into a high part exact in float32 and a small low part), then e^r by a degree-7
polynomial (1 + r + r^2 * p(r), p of degree 5), 2^n put in through the exponent bits. TOPI's
``fast_exp`` uses the same polynomial but subtracts n * ln2 with one rounded float32 ln2, an error of up
to 127 x 1.9e-9 in r. Measured against numpy's float64 exp over [-87, 88] plus 50k N(0, 16) samples
(plain llvm target): Cephes 8.0e-8 relative at most (about 1 ulp, libm expf: 6.0e-8), TOPI 4.1e-6.
Both are plain arithmetic that LLVM vectorizes, where ``llvm.exp`` becomes one libm call per element.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

# Node kinds.
CONST = "const"  # ``values``: one value, or ``width`` values along the basis axis
INPUT = "input"  # the element itself (KAN: the feature z)
ROW = "row"  # row ``start`` of the source tensor, at this element's column (LIF: the current at one step)
UNARY = "unary"  # ``op``(args[0])
BINARY = "binary"  # ``op``(args[0], args[1]); a comparison gives 1.0 / 0.0
SLICE = "slice"  # args[0][start:start + width] along the basis axis
CONCAT = "concat"  # args along the basis axis

UNARY_OPS = ("identity", "negative", "floor", "abs", "square", "sqrt", "exp", "tanh", "sigmoid", "to_bool")
COMPARE_OPS = ("greater", "greater_equal", "less", "less_equal")
BINARY_OPS = ("add", "subtract", "multiply", "divide", "maximum", "minimum", "logical_and", "logical_or",
              *COMPARE_OPS)


@dataclass(frozen=True)
class Node:
    """One node of a per-element graph, nodes in topological order (``args`` are earlier node ids)."""

    kind: str
    width: int = 1  # values per element (the basis axis of a KAN layer; 1 elsewhere)
    op: str = ""
    args: tuple[int, ...] = ()
    values: tuple[float, ...] = ()
    start: int = 0


def exp_reduced(x: Any) -> tuple[Any, Any]:
    """(n, p) with exp(x) = p * 2^n for a float32 TIR expression: n = round(x log2 e) and p the Cephes polynomial
    of the remainder, no clamping (the caller scales by 2^n as its range allows)."""
    import tvm
    from tvm.tirx import FloatImm

    def f(v: float) -> Any:
        return FloatImm("float32", v)

    n = tvm.tirx.floor(x * f(1.44269504088896341) + f(0.5))
    r = x - n * f(0.693359375) - n * f(-2.12194440e-4)
    p = f(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f(c)
    return n, p * r * r + r + f(1.0)


def fast_exp(x: Any) -> Any:
    """exp of a float32 TIR expression in plain arithmetic (see the module docstring), so the vectorizer
    keeps it in vector registers. Inputs are clamped to [ln(FLT_MIN), ln(FLT_MAX)]."""
    import tvm
    from tvm.tirx import Cast, FloatImm

    x = tvm.tirx.max(tvm.tirx.min(x, FloatImm("float32", 88.3762626647949)), FloatImm("float32", -87.3365447504019))
    n, p = exp_reduced(x)
    two_n = tvm.tirx.reinterpret("float32", (Cast("int32", n) + 127) * 8388608)  # 2^n via the exponent bits
    return p * two_n


def fast_sigmoid(x: Any) -> Any:
    """1 / (1 + exp(-x)) for a float32 TIR expression, with ``fast_exp``."""
    from tvm.tirx import FloatImm

    one = FloatImm("float32", 1.0)
    return one / (one + fast_exp(-x))


@cache
def _table(exact_exp: bool) -> dict[str, Any]:
    import tvm
    from tvm.tirx import FloatImm, Select

    one, zero = FloatImm("float32", 1.0), FloatImm("float32", 0.0)
    table: dict[str, Any] = {
        "identity": lambda a: a,
        "negative": lambda a: -a,
        "floor": tvm.tirx.floor,
        "abs": tvm.tirx.abs,
        "square": lambda a: a * a,
        "sqrt": tvm.tirx.sqrt,
        "exp": tvm.tirx.exp if exact_exp else fast_exp,
        "tanh": tvm.tirx.tanh,
        "sigmoid": tvm.tirx.sigmoid if exact_exp else fast_sigmoid,
        "to_bool": lambda a: Select(a != zero, one, zero),
        "add": lambda a, b: a + b,
        "subtract": lambda a, b: a - b,
        "multiply": lambda a, b: a * b,
        "divide": lambda a, b: a / b,
        "maximum": tvm.tirx.max,
        "minimum": tvm.tirx.min,
        "logical_and": lambda a, b: a * b,  # on 0.0 / 1.0 values
        "logical_or": tvm.tirx.max,
        "greater": lambda a, b: Select(a > b, one, zero),
        "greater_equal": lambda a, b: Select(a >= b, one, zero),
        "less": lambda a, b: Select(a < b, one, zero),
        "less_equal": lambda a, b: Select(a <= b, one, zero),
    }
    assert set(table) == {*UNARY_OPS, *BINARY_OPS}
    return table


def apply_op(op: str, *args: Any, exact_exp: bool = False) -> Any:
    """The float32 TIR expression for ``op`` (a name of UNARY_OPS / BINARY_OPS) on ``args``. ``exp`` and
    ``sigmoid`` are ``fast_exp`` / ``fast_sigmoid`` unless ``exact_exp`` (then ``llvm.exp``, bit-identical to
    TVM's generic lowering, which scalarizes into one libm call per element)."""
    return _table(exact_exp)[op](*args)


__all__ = ["BINARY_OPS", "COMPARE_OPS", "UNARY_OPS", "Node", "apply_op", "exp_reduced", "fast_exp", "fast_sigmoid"]
