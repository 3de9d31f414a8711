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

``fused_kan_int8_kernel`` is the same layer after the int8 pass (dynamic): the basis is evaluated the same way
into an fp32 scratch in basis-major order (v[j*n + i], whole vectors), quantized to uint8 with
DynamicQuantizeLinear's per-call scale and zero point (``int8_dot.emit_dynamic_quantization``), multiplied by
the int8 weight (rows permuted to the same order, packed as ``int8_dot.pack_int8``) on the CPU's int8 dot
products (``int8_dot.dot4``: vpdpbusd, vpmaddubsw + vpmaddwd, sdot), then dequantized per output column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir._elementwise import CONCAT, CONST, INPUT, SLICE, UNARY, Node, apply_op
from kernels.tvm.tir.bf16 import widened
from kernels.tvm.tir.int8_dot import (
    ISAS,
    dot4,
    emit_dynamic_quantization,
    emit_quantized_copy,
    packed_size,
    tail_width,
)

KERNEL_NAME = "kan-fused-f32"
KERNEL_NAME_BF16W = "kan-fused-bf16w"  # coefficients stored as bfloat16 (exact ones only), fp32 arithmetic
KERNEL_NAME_INT8 = "kan-fused-i8"  # dynamic int8: basis quantized per call, int8 weights, int8 dot products
MAX_OUT = 512  # accumulators for all outputs stay live: beyond this, leave the layer to the GEMV path
LOCAL_BASIS_BYTES = 65536  # the int8 kernel's fp32 basis scratch lives on the stack up to this size
CHAINS = 8  # independent int32 accumulator vectors per block of the int8 kernel (partial sums x vectors)
BLOCK_VECTORS = 4  # int32 accumulator vectors (output columns / isa lanes) per block of the int8 kernel


@dataclass
class BasisGraph:
    """The per-feature basis computation: nodes in topological order over a scalar input z."""

    nodes: list[Node] = field(default_factory=list)
    output: int = -1  # node id of the (K,) basis vector
    root: Any = None  # the Relax var holding z, shape (..., n)


Item = tuple[Any, ...]  # one basis value: ("c", value) a constant, ("r", row) a scratch row, ("z",) the input


def scratch_rows(g: BasisGraph) -> tuple[dict[int, int], int]:
    """(node id -> its first scratch row, rows in all): every non-constant node's values, per feature lane."""
    rows: dict[int, int] = {}
    nrows = 0
    for i, nd in enumerate(g.nodes):
        if nd.kind != CONST:
            rows[i] = nrows
            nrows += nd.width
    return rows, nrows


def basis_value(item: Item, z: Any, s: Any, base: Any, lane: Any) -> Any:
    """The TIR value of one basis item for feature ``base + lane``."""
    from tvm.tirx import FloatImm

    if item[0] == "c":
        return FloatImm("float32", item[1])
    if item[0] == "r":
        return s[item[1], lane]
    return z[base + lane]


def emit_basis(g: BasisGraph, k: int, rows: dict[int, int], z: Any, s: Any, base: Any, lane: Any) -> list[Item]:
    """Store every non-constant node of ``g`` for feature ``base + lane`` into the scratch ``s`` (inside the
    caller's vectorized lane loop). Returns phi_0..phi_{K-1} as items (see ``basis_value``)."""
    from tvm.script.ir_builder import tirx as T

    vals: dict[int, list[Item]] = {}

    def bcast(v: list[Item], w: int) -> list[Any]:
        return [basis_value(t, z, s, base, lane) for t in (v * w if len(v) == 1 else v)]

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
    rows, nrows = scratch_rows(g)

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
                    phi = emit_basis(g, k, rows, z, s, base, lane)
                with T.serial(0, width) as l2:
                    for j in range(k):
                        pj = basis_value(phi[j], z, s, base, l2)  # the value stored for lane l2
                        with T.vectorized(0, npad) as c:
                            T.buffer_store(acc, acc[c] + pj * widened(wq[(base + l2) * k + j, c], w_dtype), [c])
        with T.vectorized(0, out) as c:
            T.buffer_store(y, acc[c], [c])
    return ib.get()


@dataclass(frozen=True)
class Int8Layer:
    """Shape and int8 form of one dynamic-int8 KAN layer (the int8 pass's DynamicQuantizeLinear + MatMulInteger
    + scale over the basis): per-call uint8 basis values, int8 weights per output column."""

    n: int  # input features
    k: int  # basis functions per feature
    out: int  # output columns
    isa: str  # int8 dot-product family (int8_dot.ISAS)
    block_n: int  # output columns per accumulator block (whole vectors of the isa)
    lanes: int  # fp32 lanes of the basis evaluation
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    bias: bool = False

    @property
    def packed_size(self) -> int:
        return packed_size(self.n * self.k, self.out, self.block_n, ISAS[self.isa].lanes)


def basis_major(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """(n*K, out) rows i*K + j -> rows j*n + i: the order the int8 kernel stores basis values in (one
    contiguous run of features per basis function, so the evaluation stores whole vectors)."""
    return np.ascontiguousarray(w.reshape(n, k, -1).transpose(1, 0, 2).reshape(n * k, -1))


def fused_kan_int8_kernel(g: BasisGraph, p: Int8Layer) -> Any:
    """PrimFunc ``(z[x_shape] f32, wp[packed] int8, colsum[out] int32, wscale[out] f32, b[out or 1] f32,
    y[y_shape] f32)``: the whole dynamic-int8 KAN contraction, ONNX semantics of the int8 pass's graph:

        v = phi(z) (n*K values, fp32, in basis-major order j*n + i)
        sx, zp = DynamicQuantizeLinear's scale and zero point of v; vq = quantize(v) (uint8)
        y[c] = float(sum_r (vq[r] - zp) W[r, c]) * (sx * wscale[c]) [+ b[c]]

    with ``wp`` = ``pack_int8(basis_major(W), block_n, isa lanes)`` and ``colsum`` its column sums. The basis is
    evaluated vectorised across features into an fp32 scratch (L1), quantized as the graph does (int8_dot's
    ``emit_dynamic_quantization``), then multiplied on the CPU's int8 dot products (``dot4``)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    f32 = "float32"
    isa = ISAS[p.isa]
    n, k, out, lanes, V = p.n, p.k, p.out, p.lanes, isa.lanes
    nk = n * k
    K4 = -(-nk // 4)
    BN = p.block_n
    FULL, TAIL = out // BN, out % BN
    TBN = tail_width(TAIL, V)
    rows, nrows = scratch_rows(g)
    chunks, rem = n // lanes, n % lanes
    with IRBuilder() as ib, T.prim_func():
        T.func_name("kan_fused_i8")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME_INT8, "tirx.is_scheduled": True})
        zg = T.arg("z", T.buffer(p.x_shape, f32))
        wp = T.arg("wp", T.buffer((max(1, p.packed_size),), "int8"))
        cs = T.arg("colsum", T.buffer((out,), "int32"))
        ws = T.arg("wscale", T.buffer((out,), f32))
        bb = T.arg("b", T.buffer((out if p.bias else 1,), f32))
        yg = T.arg("y", T.buffer(p.y_shape, f32))
        z = T.decl_buffer((n,), f32, data=zg.data)
        y = T.decl_buffer((out,), f32, data=yg.data)
        s = T.alloc_buffer((max(1, nrows), lanes), f32, scope="local")
        v = T.alloc_buffer((1, nk), f32, scope="local" if nk * 4 <= LOCAL_BASIS_BYTES else "global")
        for count, width in ((chunks, lanes), (1 if rem else 0, rem)):
            if count == 0:
                continue
            start = 0 if width == lanes else chunks * lanes
            with T.serial(0, count) as ci:
                base = start + ci * width
                with T.vectorized(0, width) as lane:
                    phi = emit_basis(g, k, rows, z, s, base, lane)
                    for j in range(k):
                        T.buffer_store(v, basis_value(phi[j], z, s, base, lane), [0, j * n + base + lane])
        sx, zp, quantize = emit_dynamic_quantization(v, 1, nk)
        _, x32 = emit_quantized_copy(isa, v, 1, nk, quantize)
        zeff = T.bind(Cast("int32", zp) + T.int32(isa.x_shift))  # the dot multiplies vq + shift

        def result(a: Any, c: Any) -> Any:
            f = Cast(f32, a - zeff * cs[c]) * (sx * ws[c])
            return f + bb[c] if p.bias else f

        def block(woff: Any, col0: Any, W: int, NOUT: int) -> None:
            S = max(1, CHAINS // (W // V))  # partial sums over k: independent dot chains
            acc = T.alloc_buffer((S, W), "int32", scope="local")
            with T.unroll(S) as si, T.unroll(W // V) as c:
                T.buffer_store(acc, T.Broadcast(T.int32(0), V), [si, T.Ramp(c * V, 1, V)])

            def step(si: Any, c: Any, kk: Any) -> None:
                a = acc[si, T.Ramp(c * V, 1, V)]
                w = wp[T.Ramp(woff + kk * W * 4 + c * V * 4, 1, 4 * V)]
                T.buffer_store(acc, dot4(isa, a, x32[0, kk], w), [si, T.Ramp(c * V, 1, V)])

            KMAIN = K4 // S * S
            with T.serial(KMAIN // S) as ko, T.unroll(S) as si, T.unroll(W // V) as c:
                step(si, c, ko * S + si)
            with T.serial(K4 - KMAIN) as kr, T.unroll(W // V) as c:
                step(0, c, KMAIN + kr)
            with T.unroll(S - 1) as si, T.unroll(W // V) as c:
                T.buffer_store(acc, acc[0, T.Ramp(c * V, 1, V)] + acc[si + 1, T.Ramp(c * V, 1, V)],
                               [0, T.Ramp(c * V, 1, V)])
            with T.serial(NOUT) as c:
                T.buffer_store(y, result(acc[0, c], col0 + c), [col0 + c])

        if FULL > 0:
            with T.serial(FULL) as nb:
                block(nb * K4 * BN * 4, nb * BN, BN, BN)
        if TAIL > 0:
            block(FULL * K4 * BN * 4, FULL * BN, TBN, TAIL)
    return ib.get()


def int8_block_n(out: int, isa: str) -> int:
    """Output columns per accumulator block: up to BLOCK_VECTORS whole vectors of the isa (all of ``out``
    when it fits, so the quantized basis is read once)."""
    v = ISAS[isa].lanes
    return min(BLOCK_VECTORS * v, -(-out // v) * v)


def pack_coefficients(w: np.ndarray, lanes: int) -> np.ndarray:
    """(n*K, out) -> (n*K, Npad) zero padded to whole vectors."""
    npad = -(-w.shape[1] // lanes) * lanes
    out = np.zeros((w.shape[0], npad), np.float32)
    out[:, : w.shape[1]] = w
    return out


__all__ = ["KERNEL_NAME", "KERNEL_NAME_BF16W", "KERNEL_NAME_INT8", "MAX_OUT", "BasisGraph", "Int8Layer", "basis_major",
           "fused_kan_int8_kernel", "fused_kan_kernel", "int8_block_n", "pack_coefficients"]
