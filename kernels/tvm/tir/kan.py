"""Fused KAN layer: basis evaluation + contraction in one TIR kernel, no basis tensor in memory.

A KAN layer exports as ``matmul(reshape(B(z)), W)``: ``B`` maps each input feature z_i to K basis
values through a small per-feature graph (B-spline Cox-de Boor steps, Gaussian RBFs, Chebyshev
recurrence: elementwise ops, comparisons, slices and concats along the basis axis, constants shared
by all features), then a (n*K, out) contraction. The generic lowering writes the (n, K) basis tensor
(and every intermediate of the recursion) to memory and reads it back in a naive matmul.

The ``fuse-kan`` pass (``kernels.tvm.passes.fuse_kan``) reads the per-feature graph straight off the Relax
IR (no knowledge of which basis it is, so any export of that shape fuses); this module emits one kernel
for it (``fused_kan_kernel``), ``exp`` as the shared ``fast_exp`` (``kernels.tvm.tir._elementwise``):

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

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir._elementwise import CONCAT, CONST, INPUT, SLICE, UNARY, Node, apply_op
from kernels.tvm.tir.bf16 import widened

KERNEL_NAME = "kan-fused-f32"
KERNEL_NAME_BF16W = "kan-fused-bf16w"  # coefficients stored as bfloat16 (exact ones only), fp32 arithmetic
MAX_OUT = 512  # accumulators for all outputs stay live: beyond this, leave the layer to the GEMV path


@dataclass
class BasisGraph:
    """The per-feature basis computation: nodes in topological order over a scalar input z."""

    nodes: list[Node] = field(default_factory=list)
    output: int = -1  # node id of the (K,) basis vector
    root: Any = None  # the Relax var holding z, shape (..., n)


def fused_kan_kernel(g: BasisGraph, n: int, k: int, out: int, lanes: int, x_shape: tuple[int, ...],
                     y_shape: tuple[int, ...], w_dtype: str = "float32") -> Any:
    """PrimFunc ``(z[x_shape], wq[n*K, Npad], y[y_shape])``: y = sum_ij phi_j(z_i) W[iK+j]; ``wq`` stored
    in ``w_dtype`` (float32, or bfloat16 widened to fp32 on load)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import FloatImm

    f32 = "float32"
    npad = -(-out // lanes) * lanes
    zero = FloatImm(f32, 0.0)
    # scratch rows: every non-constant node's values, per feature lane
    rows: dict[int, int] = {}
    nrows = 0
    for i, nd in enumerate(g.nodes):
        if nd.kind != CONST:
            rows[i] = nrows
            nrows += nd.width

    def emit_chunk(z: Any, s: Any, base: Any, lane: Any) -> list[tuple[Any, ...]]:
        """Store every node for ``lane`` (feature base + lane). Returns phi_0..phi_{K-1} as items:
        ("c", value) a constant, ("r", row) a scratch row, ("z",) the input itself."""
        vals: dict[int, list[tuple[Any, ...]]] = {}

        def ex(item: tuple[Any, ...]) -> Any:
            if item[0] == "c":
                return FloatImm(f32, item[1])
            if item[0] == "r":
                return s[item[1], lane]
            return z[base + lane]

        def bcast(v: list[tuple[Any, ...]], w: int) -> list[Any]:
            return [ex(t) for t in (v * w if len(v) == 1 else v)]

        for i, nd in enumerate(g.nodes):
            if nd.kind == CONST:
                vals[i] = [("c", float(c)) for c in nd.values]
                continue
            if nd.kind == INPUT:
                vals[i] = [("z",)]
                continue
            if nd.kind == SLICE:
                vals[i] = vals[nd.args[0]][nd.start:nd.start + nd.width]
                continue
            if nd.kind == CONCAT:
                vals[i] = [t for p in nd.args for t in (vals[p] * g.nodes[p].width if len(vals[p]) == 1 else vals[p])]
                continue
            if nd.kind == UNARY and nd.op == "identity":
                vals[i] = vals[nd.args[0]]
                continue
            exprs = [apply_op(nd.op, *ts) for ts in zip(*(bcast(vals[a], nd.width) for a in nd.args), strict=False)]
            r = rows[i]
            for j, e in enumerate(exprs):
                T.buffer_store(s, e, [r + j, lane])
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
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME if w_dtype == f32 else KERNEL_NAME_BF16W,
                     "tirx.is_scheduled": True})
        zg = T.arg("z", T.buffer(x_shape, f32))
        wq = T.arg("wq", T.buffer((n * k, npad), w_dtype))
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
                with T.vectorized(0, width) as lane:
                    phi = emit_chunk(z, s, base, lane)
                with T.serial(0, width) as l2:
                    for j in range(k):
                        pj = item_at(phi[j], z, s, base, l2)  # the value stored for lane l2
                        with T.vectorized(0, npad) as c:
                            T.buffer_store(acc, acc[c] + pj * widened(wq[(base + l2) * k + j, c], w_dtype), [c])
        with T.vectorized(0, out) as c:
            T.buffer_store(y, acc[c], [c])
    return ib.get()


def pack_coefficients(w: np.ndarray, lanes: int) -> np.ndarray:
    """(n*K, out) -> (n*K, Npad) zero padded to whole vectors."""
    npad = -(-w.shape[1] // lanes) * lanes
    out = np.zeros((w.shape[0], npad), np.float32)
    out[:, : w.shape[1]] = w
    return out


__all__ = ["KERNEL_NAME", "KERNEL_NAME_BF16W", "MAX_OUT", "BasisGraph", "fused_kan_kernel", "pack_coefficients"]
