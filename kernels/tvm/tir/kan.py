"""Fused KAN layer: basis evaluation + contraction in one TIR kernel, no basis tensor in memory.

A KAN layer exports as ``matmul(reshape(B(z)), W)``: ``B`` maps each input feature z_i to K basis
values through a small per-feature graph (B-spline Cox-de Boor steps, Gaussian RBFs, Chebyshev
recurrence: elementwise ops, comparisons, slices and concats along the basis axis, constants shared
by all features), then a (n*K, out) contraction. The generic lowering writes the (n, K) basis tensor
(and every intermediate of the recursion) to memory and reads it back in a naive matmul.

This module reads the per-feature graph straight off the Relax IR (``extract_basis``: no knowledge of
which basis it is, so any export of that shape fuses) and emits one kernel (``fused_kan_kernel``):

    for each chunk of L input features (L = the profile's vector lanes):
        evaluate the basis graph for the L features at once, vectorised across features, into a
        (nodes, L) scratch that lives in registers / L1
        for each feature l, basis j:  acc[0:N] += phi_j(z_l) * W[(i*K + j), 0:N]   (vector FMAs)

The coefficient matrix is streamed exactly once, row-major, and nothing of size n*K is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.tvm.relax_match import NoMatch, const_ints, static_shape

KERNEL_NAME = "kan-fused-f32"
MAX_OUT = 512  # accumulators for all outputs stay live: beyond this, leave the layer to the GEMV path

UNARY = ("exp", "tanh", "sigmoid", "negative", "sqrt", "square")
BINARY = ("add", "subtract", "multiply", "divide", "greater_equal", "greater", "less", "less_equal",
          "logical_and", "logical_or", "maximum", "minimum", "power")


@dataclass
class BasisGraph:
    """The per-feature basis computation: nodes in topological order over a scalar input z."""

    nodes: list[tuple[Any, ...]] = field(default_factory=list)  # (kind, width, payload...)
    output: int = -1  # node id of the (K,) basis vector
    root: Any = None  # the Relax var holding z, shape (..., n)


def extract_basis(v_expr: Any, lookup: Any, const_of: Any) -> BasisGraph:
    """Per-feature graph producing ``v_expr`` (shape (..., n, K)); raises NoMatch."""
    import tvm
    from tvm import relax

    vshape = static_shape(v_expr)
    root_shape = vshape[:-1]
    rank = len(vshape)
    g = BasisGraph()
    memo: dict[Any, int] = {}

    def add(node: tuple[Any, ...]) -> int:
        g.nodes.append(node)
        return len(g.nodes) - 1

    def width_of(e: Any) -> int:
        s = static_shape(e)
        if s == root_shape or s == (*root_shape, 1):
            return 1
        if len(s) == rank and s[:-1] == root_shape:
            return s[-1]
        raise NoMatch(f"shape {s} is not per-feature")

    def const_node(arr: np.ndarray) -> int:
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim <= rank and all(d == 1 for d in a.shape[:-1]):
            return add(("const", a.size if a.ndim else 1, a.reshape(-1)))
        if a.size and np.all(a == a.reshape(-1)[0]):  # a per-feature constant that is uniform (ones_like)
            return add(("const", 1, a.reshape(-1)[:1]))
        raise NoMatch("feature-dependent constant")

    def visit(e: Any) -> int:
        if e in memo:
            return memo[e]
        c = const_of(e)
        if c is not None:
            nid = const_node(c)
        elif isinstance(e, relax.Var):
            val = lookup(e)
            nid = -1
            if val is not None and isinstance(val, relax.Call) and _supported(val):
                # A per-feature op on an (…, n) tensor may belong to the basis (ChebyKAN's tanh) or to
                # the previous layer (a residual add): try to extend, else this var is the input z.
                saved = (len(g.nodes), g.root, dict(memo))
                try:
                    nid = visit_call(val)
                except NoMatch:
                    if static_shape(e) != root_shape:
                        raise
                    del g.nodes[saved[0]:]
                    g.root = saved[1]
                    memo.clear()
                    memo.update(saved[2])
                    nid = -1
            if nid < 0:
                if static_shape(e) != root_shape:
                    raise NoMatch("leaf is not a (…, n) tensor")
                if g.root is not None and not g.root.same_as(e):
                    raise NoMatch("basis depends on two tensors")
                g.root = e
                nid = add(("z", 1))
        elif isinstance(e, relax.Call):
            nid = visit_call(e)
        else:
            raise NoMatch(f"unsupported expression {type(e).__name__}")
        memo[e] = nid
        return nid

    def _supported(call: Any) -> bool:
        if not isinstance(call.op, tvm.ir.Op):
            return False
        name = call.op.name.removeprefix("relax.")
        if name not in (*UNARY, *BINARY, "astype", "expand_dims", "strided_slice", "concat"):
            return False
        try:  # ops on other shapes (e.g. the previous layer) end the basis graph
            width_of(call)
        except NoMatch:
            return False
        return True

    def visit_call(call: Any) -> int:
        name = call.op.name.removeprefix("relax.")
        w = width_of(call)
        if name in UNARY:
            return add(("unary", w, name, visit(call.args[0])))
        if name in BINARY:
            a, b = visit(call.args[0]), visit(call.args[1])
            if name == "power":
                if g.nodes[b][0] != "const" or g.nodes[b][1] != 1 or float(g.nodes[b][2][0]) != 2.0:
                    raise NoMatch("power with an exponent other than 2")
                return add(("unary", w, "square", a))
            return add(("binary", w, name, a, b))
        if name == "astype":
            if str(call.attrs.dtype) not in ("float32", "bool"):
                raise NoMatch(f"astype {call.attrs.dtype}")
            return add(("unary", w, "to_bool" if str(call.attrs.dtype) == "bool" else "identity",
                        visit(call.args[0])))
        if name == "expand_dims":
            axes = [int(a) for a in call.attrs.axis]
            if axes not in ([rank - 1], [-1]):
                raise NoMatch("expand_dims on another axis")
            return add(("unary", w, "identity", visit(call.args[0])))
        if name == "strided_slice":
            axes, begin, end = const_ints(call.args[1]), const_ints(call.args[2]), const_ints(call.args[3])
            strides = const_ints(call.args[4]) if len(call.args) > 4 else [1]
            if axes not in ([rank - 1], [-1]) or strides != [1]:
                raise NoMatch("strided_slice off the basis axis")
            src = visit(call.args[0])
            width = g.nodes[src][1]
            lo, hi, _ = slice(begin[0], end[0]).indices(width)
            if hi - lo != w:
                raise NoMatch("slice width mismatch")
            return add(("slice", w, src, lo))
        if name == "concat":
            if int(call.attrs.axis) not in (rank - 1, -1):
                raise NoMatch("concat off the basis axis")
            parts = [visit(p) for p in call.args[0].fields]
            if sum(g.nodes[p][1] for p in parts) != w:
                raise NoMatch("concat width mismatch")
            return add(("concat", w, parts))
        raise NoMatch(f"op {name}")

    g.output = visit(v_expr)
    if g.root is None:
        raise NoMatch("basis does not depend on an input")
    return g


def fused_kan_kernel(g: BasisGraph, n: int, k: int, out: int, lanes: int, x_shape: tuple[int, ...],
                     y_shape: tuple[int, ...]) -> Any:
    """PrimFunc ``(z[x_shape], wq[n*K, Npad], y[y_shape])``: y = sum_ij phi_j(z_i) W[iK+j]."""
    import tvm
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import FloatImm, Select

    f32 = "float32"
    npad = -(-out // lanes) * lanes
    one, zero = FloatImm(f32, 1.0), FloatImm(f32, 0.0)
    # scratch rows: every non-constant node's values, per feature lane
    rows: dict[int, int] = {}
    nrows = 0
    for i, nd in enumerate(g.nodes):
        if nd[0] != "const":
            rows[i] = nrows
            nrows += nd[1]

    def emit_chunk(z: Any, s: Any, base: Any, l: Any) -> list[tuple[Any, ...]]:
        """Store every node for lane ``l`` (feature base + l). Returns phi_0..phi_{K-1} as items:
        ("c", value) a constant, ("r", row) a scratch row, ("z",) the input itself."""
        vals: dict[int, list[tuple[Any, ...]]] = {}

        def ex(item: tuple[Any, ...]) -> Any:
            if item[0] == "c":
                return FloatImm(f32, item[1])
            if item[0] == "r":
                return s[item[1], l]
            return z[base + l]

        def bcast(v: list[tuple[Any, ...]], w: int) -> list[Any]:
            return [ex(t) for t in (v * w if len(v) == 1 else v)]

        for i, nd in enumerate(g.nodes):
            kind, w = nd[0], nd[1]
            if kind == "const":
                vals[i] = [("c", float(c)) for c in nd[2]]
                continue
            if kind == "z":
                vals[i] = [("z",)]
                continue
            if kind == "slice":
                vals[i] = vals[nd[2]][nd[3]:nd[3] + w]
                continue
            if kind == "concat":
                vals[i] = [t for p in nd[2] for t in (vals[p] * g.nodes[p][1] if len(vals[p]) == 1 else vals[p])]
                continue
            if kind == "unary" and nd[2] == "identity":
                vals[i] = vals[nd[3]]
                continue
            if kind == "unary":
                fn = {"exp": _fast_exp, "tanh": tvm.tirx.tanh, "sqrt": tvm.tirx.sqrt,
                      "sigmoid": tvm.tirx.sigmoid, "negative": lambda t: -t, "square": lambda t: t * t,
                      "to_bool": lambda t: Select(t != zero, one, zero)}[nd[2]]
                exprs = [fn(t) for t in bcast(vals[nd[3]], w)]
            else:
                op, a, b = nd[2], bcast(vals[nd[3]], w), bcast(vals[nd[4]], w)
                cmp = {"greater_equal": lambda p, q: p >= q, "greater": lambda p, q: p > q,
                       "less": lambda p, q: p < q, "less_equal": lambda p, q: p <= q}
                if op in cmp:
                    exprs = [Select(cmp[op](p, q), one, zero) for p, q in zip(a, b)]
                else:
                    fn2 = {"add": lambda p, q: p + q, "subtract": lambda p, q: p - q,
                           "multiply": lambda p, q: p * q, "divide": lambda p, q: p / q,
                           "logical_and": lambda p, q: p * q,  # 0/1 floats
                           "logical_or": tvm.tirx.max, "maximum": tvm.tirx.max, "minimum": tvm.tirx.min}[op]
                    exprs = [fn2(p, q) for p, q in zip(a, b)]
            r = rows[i]
            for j, e in enumerate(exprs):
                T.buffer_store(s, e, [r + j, l])
            vals[i] = [("r", r + j) for j in range(len(exprs))]
        phi = vals[g.output]
        return phi * k if len(phi) == 1 else phi

    def item_at(item: tuple[Any, ...], z: Any, s: Any, base: Any, lane: Any) -> Any:
        if item[0] == "c":
            return FloatImm(f32, item[1])
        if item[0] == "r":
            return s[item[1], lane]
        return z[base + lane]

    chunks, rem = n // lanes, n % lanes
    with IRBuilder() as ib, T.prim_func():
        T.func_name("kan_fused")
        T.func_attr({"tirx.noalias": True, "edgec.kernel": KERNEL_NAME, "tirx.is_scheduled": True})
        zg = T.arg("z", T.buffer(x_shape, f32))
        wq = T.arg("wq", T.buffer((n * k, npad), f32))
        yg = T.arg("y", T.buffer(y_shape, f32))
        z = T.decl_buffer((n,), f32, data=zg.data)
        y = T.decl_buffer((out,), f32, data=yg.data)
        s = T.alloc_buffer((max(1, nrows), lanes), f32, scope="local")
        acc = T.alloc_buffer((npad,), f32, scope="local")
        with T.vectorized(0, npad) as c:
            T.buffer_store(acc, zero, [c])
        for count, width in ((chunks, lanes), (1 if rem else 0, rem)):
            if count == 0:
                continue
            start = 0 if width == lanes else chunks * lanes
            with T.serial(0, count) as ci:
                base = start + ci * width
                with T.vectorized(0, width) as l:
                    phi = emit_chunk(z, s, base, l)
                with T.serial(0, width) as l2:
                    for j in range(k):
                        pj = item_at(phi[j], z, s, base, l2)  # the value stored for lane l2
                        with T.vectorized(0, npad) as c:
                            T.buffer_store(acc, acc[c] + pj * wq[(base + l2) * k + j, c], [c])
        with T.vectorized(0, out) as c:
            T.buffer_store(y, acc[c], [c])
    return ib.get()


def _fast_exp(x: Any) -> Any:
    """exp for float32 in plain arithmetic (Cephes expf: range reduction + degree-6 polynomial, ~2 ulp),
    so the vectoriser keeps it in vector registers; llvm.exp would scalarise into libm calls."""
    import tvm
    from tvm.tirx import Cast, FloatImm

    def f(v: float) -> Any:
        return FloatImm("float32", v)

    x = tvm.tirx.max(tvm.tirx.min(x, f(88.3762626647949)), f(-87.3365447504019))
    n = tvm.tirx.floor(x * f(1.44269504088896341) + f(0.5))
    r = x - n * f(0.693359375) - n * f(-2.12194440e-4)
    p = f(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f(c)
    p = p * r * r + r + f(1.0)
    two_n = tvm.tirx.reinterpret("float32", (Cast("int32", n) + 127) * 8388608)  # 2^n via the exponent bits
    return p * two_n


def pack_coefficients(w: np.ndarray, lanes: int) -> np.ndarray:
    """(n*K, out) -> (n*K, Npad) zero padded to whole vectors."""
    npad = -(-w.shape[1] // lanes) * lanes
    out = np.zeros((w.shape[0], npad), np.float32)
    out[:, : w.shape[1]] = w
    return out


__all__ = ["KERNEL_NAME", "BasisGraph", "NoMatch", "extract_basis", "fused_kan_kernel", "pack_coefficients"]
