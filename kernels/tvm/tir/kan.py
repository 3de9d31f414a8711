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
A basis with a closed form whose value range is known before its values (uniform B-splines, Gaussian RBFs on
evenly spaced centers) is streamed instead (``emit_streamed_layer``): the scale first, from the values' bounds,
then per chunk of features its values are made, quantized and multiplied while they are in registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir._elementwise import CONCAT, CONST, INPUT, SLICE, UNARY, Node, apply_op, exp_reduced, fast_exp
from kernels.tvm.tir.bf16 import widened
from kernels.tvm.tir.int8_dot import (
    ISAS,
    dot4,
    emit_dynamic_quantization,
    packed_size,
    quantization_of_extrema,
    tail_width,
)

KERNEL_NAME = "kan-fused-f32"
KERNEL_NAME_BF16W = "kan-fused-bf16w"  # coefficients stored as bfloat16 (exact ones only), fp32 arithmetic
KERNEL_NAME_INT8 = "kan-fused-i8"  # dynamic int8: basis quantized per call, int8 weights, int8 dot products
MAX_OUT = 512  # accumulators for all outputs stay live: beyond this, leave the layer to the GEMV path
# The int8 kernel's scratch scope. TVM 0.27's LowerTVMBuiltin puts a "global" allocation of constant size under
# 1 KB on the stack (LLVM keeps it in registers where it can: the accumulators, the extrema) and turns any other,
# "local" ones of every size included, into a TVMBackendAllocWorkspace / FreeWorkspace pair per call.
SCRATCH_SCOPE = "global"
CHAINS = 8  # independent int32 accumulator vectors per block of the int8 kernel (partial sums x vectors)
QUANT_LANES = 16  # values per vector of the per-call quantization
BLOCK_VECTORS = 4  # int32 accumulator vectors (output columns / isa lanes) per block of the int8 kernel


@dataclass
class BasisGraph:
    """The per-feature basis computation: nodes in topological order over a scalar input z."""

    nodes: list[Node] = field(default_factory=list)
    output: int = -1  # node id of the (K,) basis vector
    root: Any = None  # the Relax var holding z, shape (..., n)


# one basis value: ("c", value) a constant, ("r", row) a scratch row, ("v", var) a let-bound value, ("z",) the input
Item = tuple[Any, ...]


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
    if item[0] == "v":
        return item[1]
    return z[base + lane]


def emit_basis(g: BasisGraph, k: int, rows: dict[int, int], z: Any, s: Any, base: Any, lane: Any,
               bind: bool = False) -> list[Item]:
    """Store every non-constant node of ``g`` for feature ``base + lane`` into the scratch ``s`` (inside the
    caller's vectorized lane loop), or with ``bind`` keep each in a let-bound variable (registers: only for
    a caller that uses phi inside the same lane loop). Returns phi_0..phi_{K-1} as items (see ``basis_value``)."""
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
        if bind:
            vals[i] = [("v", T.bind(e)) for e in exprs]
            continue
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
class BaseBranch:
    """The layer's base branch over its input x, in dynamic int8: ``S(x) @ Wb * scales + bias`` with S a
    per-element graph (efficient-kan / FastKAN's SiLU), quantized per call like the basis."""

    graph: BasisGraph  # width-1 nodes over x
    out: int
    bias: bool


@dataclass(frozen=True)
class Segment:
    """One basis over (a subset of) the layer's features: S-KAN concatenates several, each over a constant
    gather of the normalized input; a plain KAN layer has one over all features (``gather`` False)."""

    graph: BasisGraph
    n: int  # features it expands
    k: int  # basis functions per feature
    gather: bool  # its features are z[idx] for a constant int32 idx (a kernel argument), else z itself


@dataclass(frozen=True)
class Int8Layer:
    """Shape and int8 form of one dynamic-int8 KAN layer (the int8 pass's DynamicQuantizeLinear + MatMulInteger
    + scale over the basis): per-call uint8 basis values, int8 weights per output column. With ``norm_eps``
    the basis input z is LayerNorm(x) over the n features (gamma, beta given), computed in the kernel; with
    ``base`` the base branch over x is computed too and added (the whole layer in one kernel)."""

    n: int  # input features
    segments: tuple[Segment, ...]  # the bases whose values are concatenated (their rows of W, in order)
    out: int  # output columns
    isa: str  # int8 dot-product family (int8_dot.ISAS)
    block_n: int  # output columns per accumulator block (whole vectors of the isa)
    lanes: int  # fp32 lanes of the basis evaluation
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    bias: bool = False
    norm_eps: float | None = None
    base: BaseBranch | None = None

    @property
    def nk(self) -> int:
        """Rows of the contraction: basis values per call."""
        return sum(sg.n * sg.k for sg in self.segments)

    @property
    def rows(self) -> int:
        """Rows of the packed weight: ``nk``, or per chunk of a streamed layer (``streamed_basis``) its K runs of
        its features rounded up to whole words (the rest zero)."""
        if streamed_basis(self) is None:
            return self.nk
        rem = self.n % self.lanes
        return self.segments[0].k * (self.n - rem + -(-rem // 4) * 4)

    @property
    def packed_size(self) -> int:
        return packed_size(self.rows, self.out, self.block_n, ISAS[self.isa].lanes)


def streamed_basis(p: Int8Layer) -> UniformBSpline | GaussianRbf | None:
    """The closed form the int8 kernel streams ``p`` with (``emit_streamed_layer``): one basis over all of z whose
    value range is known before its values (uniform B-splines, Gaussian RBFs), every output column in one block of
    accumulators, whole words per vector of features; None: the layer is evaluated, quantized and contracted in
    three passes."""
    if len(p.segments) != 1 or p.segments[0].gather or p.out > p.block_n or p.lanes % 4:
        return None
    sg = p.segments[0]
    return uniform_bspline(sg.graph, sg.k) or gaussian_rbf(sg.graph, sg.k)


def chunk_major(w: np.ndarray, n: int, k: int, lanes: int) -> np.ndarray:
    """(n*K, out) rows i*K + j -> the streamed kernel's order: per chunk of ``lanes`` features, per basis j, the
    chunk's features (the last chunk's rounded up to a multiple of 4 with zero rows): one word of 4 features at a
    time, in the order the chunk's quantized values are made."""
    out = w.shape[1]
    w3 = w.reshape(n, k, out)
    parts = []
    for c0 in range(0, n, lanes):
        wc = min(lanes, n - c0)
        blk = np.zeros((k, -(-wc // 4) * 4, out), w.dtype)
        blk[:, :wc] = w3[c0:c0 + wc].transpose(1, 0, 2)
        parts.append(blk.reshape(-1, out))
    return np.ascontiguousarray(np.concatenate(parts))


def int8_weight_rows(p: Int8Layer, w: np.ndarray) -> np.ndarray:
    """The layer's (n*K, out) int8 spline weight (rows i*K + j per segment, concatenated) in the row order the
    kernel multiplies it in (``pack_int8`` it): ``chunk_major`` for a streamed layer, else ``basis_major`` per
    segment."""
    if streamed_basis(p) is not None:
        sg = p.segments[0]
        return chunk_major(w, sg.n, sg.k, p.lanes)
    starts = np.cumsum([0, *(sg.n * sg.k for sg in p.segments)])
    return np.concatenate([basis_major(w[starts[i]:starts[i + 1]], sg.n, sg.k) for i, sg in enumerate(p.segments)])


def basis_major(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """(n*K, out) rows i*K + j -> rows j*n + i: the order the int8 kernel stores basis values in (one
    contiguous run of features per basis function, so the evaluation stores whole vectors)."""
    return np.ascontiguousarray(w.reshape(n, k, -1).transpose(1, 0, 2).reshape(n * k, -1))


# Pieces of the cardinal B-spline of each degree on [0, degree + 1): piece m (basis j on the interval i = j + m)
# as a polynomial in the fractional position f of the interval, Horner coefficients, highest power first.
BSPLINE_PIECES: dict[int, tuple[tuple[float, ...], ...]] = {
    1: ((1.0, 0.0), (-1.0, 1.0)),
    2: ((0.5, 0.0, 0.0), (-1.0, 1.0, 0.5), (0.5, -1.0, 0.5)),
    3: ((1 / 6, 0.0, 0.0, 0.0), (-0.5, 0.5, 0.5, 1 / 6), (0.5, -1.0, 0.0, 2 / 3), (-1 / 6, 0.5, -0.5, 1 / 6)),
}
BSPLINE_TOLERANCE = 1e-5  # a basis graph is taken for a closed form when it agrees to this everywhere probed
_NUMPY_OPS: dict[str, Any] = {
    "identity": lambda a: a, "negative": np.negative, "floor": np.floor, "abs": np.abs, "square": np.square,
    "sqrt": np.sqrt, "exp": np.exp, "tanh": np.tanh, "sigmoid": lambda a: 1 / (1 + np.exp(-a)),
    "to_bool": lambda a: (a != 0).astype(np.float32), "add": np.add, "subtract": np.subtract,
    "multiply": np.multiply, "divide": np.divide, "maximum": np.maximum, "minimum": np.minimum,
    "logical_and": np.multiply, "logical_or": np.maximum,
    "greater": lambda a, b: (a > b).astype(np.float32), "greater_equal": lambda a, b: (a >= b).astype(np.float32),
    "less": lambda a, b: (a < b).astype(np.float32), "less_equal": lambda a, b: (a <= b).astype(np.float32),
}


def evaluate_basis(g: BasisGraph, k: int, z: np.ndarray) -> np.ndarray:
    """(len(z), K) float32: the basis graph evaluated in numpy, as the kernel's ``emit_basis`` reads it."""
    vals: list[np.ndarray] = []

    def full(i: int) -> np.ndarray:
        return np.broadcast_to(vals[i], (len(z), g.nodes[i].width))

    with np.errstate(all="ignore"):
        for nd in g.nodes:
            if nd.kind == CONST:
                v = np.asarray(nd.values, np.float32)[None, :]
            elif nd.kind == INPUT:
                v = z.astype(np.float32)[:, None]
            elif nd.kind == SLICE:
                v = full(nd.args[0])[:, nd.start:nd.start + nd.width]
            elif nd.kind == CONCAT:
                v = np.concatenate([full(a) for a in nd.args], axis=1)
            else:
                v = np.asarray(_NUMPY_OPS[nd.op](*(vals[a] for a in nd.args)), np.float32)
            vals.append(v)
        return np.broadcast_to(vals[g.output], (len(z), k)).astype(np.float32)


@dataclass(frozen=True)
class UniformBSpline:
    """B-splines of ``degree`` on the uniform knots t0 + m*h: on the interval i = floor((z - t0) / h), with f the
    fractional position in it, basis j = i - m is piece m of the cardinal B-spline at f (``BSPLINE_PIECES``) for m
    in 0..degree, every other basis 0. No recursion, no division."""

    t0: float
    h: float
    degree: int

    def values(self, z: np.ndarray, k: int) -> np.ndarray:
        """(len(z), K) in numpy, the same arithmetic as ``emit``."""
        u = (z.astype(np.float32) - np.float32(self.t0)) * np.float32(1 / self.h)
        i = np.floor(u)
        f = u - i
        pieces = [_horner(c, f, np.float32) for c in BSPLINE_PIECES[self.degree]]
        out = np.zeros((len(z), k), np.float32)
        for j in range(k):
            for m, pm in enumerate(pieces):
                out[:, j] = np.where(i - j == m, pm, out[:, j])
        return out

    def emit(self, z: Any, k: int, scale: Any = None, ldexp: bool = False) -> list[Any]:
        """The K basis values of the float32 TIR value ``z`` (inside the caller's vectorized lane loop), times
        ``scale`` where given (each piece multiplied once; no exp: ``ldexp`` is ignored)."""
        from tvm.script.ir_builder import tirx as T
        from tvm.tirx import Select

        i, pieces = self._pieces(z)
        if scale is not None:
            pieces = [T.bind(pc * scale) for pc in pieces]
        out = []
        for j in range(k):
            d = T.bind(i - T.float32(j))
            e: Any = T.float32(0)
            for m in reversed(range(len(pieces))):
                e = Select(d == T.float32(m), pieces[m], e)
            out.append(e)
        return out

    def _pieces(self, z: Any) -> tuple[Any, list[Any]]:
        """(the interval index as a float, the degree + 1 pieces at the fractional position) of the TIR value z."""
        from tvm.script.ir_builder import tirx as T

        u = T.bind((z - T.float32(self.t0)) * T.float32(1 / self.h))
        i = T.bind(T.floor(u))
        f = T.bind(u - i)
        return i, [T.bind(_horner(c, f, T.float32)) for c in BSPLINE_PIECES[self.degree]]

    def emit_range(self, z: Any, k: int) -> tuple[Any, Any]:
        """(an upper, a lower bound) of the K values ``emit`` makes for z, 0 included: the largest and the
        smallest of the pieces that fall on a basis (the same float operations), and 0. Exact."""
        from tvm.script.ir_builder import tirx as T
        from tvm.tirx import Select

        i, pieces = self._pieces(z)
        vals = [Select(T.And(i >= T.float32(m), i <= T.float32(k - 1 + m)), pieces[m], T.float32(0))
                for m in range(len(pieces))]
        return _tree(T.max, vals), _tree(T.min, vals)

    def range_value(self, hi: Any) -> Any:
        return hi

    positive = False  # a piece can come out a rounding error below 0

    def denormals(self, k: int) -> bool:
        return False  # pieces of a cubic at most: none below FLT_MIN but 0

    def exps_in_range(self, k: int) -> bool:
        return True


def _horner(coefs: tuple[float, ...], f: Any, const: Any) -> Any:
    e = const(coefs[0])
    for c in coefs[1:]:
        e = e * f + const(c)
    return e


def uniform_bspline(g: BasisGraph, k: int) -> UniformBSpline | None:
    """The closed form of ``g`` when it computes K B-splines on a uniform grid (Cox-de Boor as efficient-kan
    exports it, or any other form): candidate knots from the graph's evenly spaced constants, degrees 1-3, each
    checked against the graph evaluated on a dense sweep over and beyond the grid and on every knot."""
    seen: set[tuple[float, float, int]] = set()
    for nd in g.nodes:
        if nd.kind != CONST or nd.width < 2:
            continue
        c = np.asarray(nd.values, np.float64)
        h = float(c[1] - c[0])
        if h <= 0 or not np.allclose(np.diff(c), h, rtol=1e-5, atol=0):
            continue
        for shift in range(4):
            for degree in BSPLINE_PIECES:
                cand = (float(c[0] - shift * h), h, degree)
                key = (round(cand[0] / h, 3), round(h, 7), degree)
                if key in seen:
                    continue
                seen.add(key)
                sp = UniformBSpline(*cand)
                knots = sp.t0 + sp.h * np.arange(k + degree + 1)
                z = np.concatenate([np.linspace(sp.t0 - 2 * h, knots[-1] + 2 * h, 4001), knots,
                                    np.nextafter(knots.astype(np.float32), np.float32(-np.inf))]).astype(np.float32)
                ref = evaluate_basis(g, k, z)
                if np.max(ref) > 0.1 and np.all(np.abs(sp.values(z, k) - ref) <= BSPLINE_TOLERANCE):
                    return sp
    return None


def _exp_scaled(x: Any, ldexp: bool) -> Any:
    """``fast_exp`` (Cephes' expf) for an x known to lie in [ln(FLT_MIN), ln(FLT_MAX)] (no clamp), 2^n put in by
    ``llvm.ldexp`` with ``ldexp`` (AVX-512: one vscalefps, no shift / add / multiply), else ``fast_exp`` itself."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    if not ldexp:
        return fast_exp(x)
    n, p = exp_reduced(x)
    return T.call_llvm_pure_intrin("float32", "llvm.ldexp", p, Cast("int32", n))


GAUSS_REACH = 6.0  # the Gaussian recurrence clamps the scaled input to this many widths beyond the outer centers
GAUSS_MAX_EXPONENT = 80.0  # and is used only while every constant factor exp(-(2r-1) delta^2) is a normal float


@dataclass(frozen=True)
class GaussianRbf:
    """Gaussian RBFs ``phi_j(z) = exp(-((z - c0 - j*dc) * a)^2)`` on evenly spaced centers, evaluated from the middle
    center m by the ratio of neighbours: with t = (z - c0) * a - m*delta (delta = dc * a), phi_m = exp(-t^2) and
    phi_{m+-r} = phi_{m+-(r-1)} * exp(+-2 delta t) * exp(-(2r-1) delta^2): three exps per feature instead of K. The
    scaled input is clamped to GAUSS_REACH widths beyond the outer centers (every value there is below
    exp(-GAUSS_REACH^2), far under one quantization step), so no intermediate overflows."""

    c0: float
    dc: float
    a: float

    def _parts(self, k: int) -> tuple[float, int, list[float]]:
        delta = self.dc * self.a
        return delta, k // 2, [float(np.exp(-(2 * r - 1) * delta * delta)) for r in range(1, k)]

    def values(self, z: np.ndarray, k: int) -> np.ndarray:
        """(len(z), K) in numpy, the same arithmetic as ``emit`` (with exact exps)."""
        f32 = np.float32
        delta, m, fac = self._parts(k)
        s = np.clip((z.astype(f32) - f32(self.c0)) * f32(self.a), f32(-GAUSS_REACH), f32((k - 1) * delta + GAUSS_REACH))
        t = s - f32(m * delta)
        up, down = np.exp(f32(2 * delta) * t), np.exp(f32(-2 * delta) * t)
        out = np.zeros((len(z), k), f32)
        out[:, m] = np.exp(-(t * t))
        for r in range(1, k - m):
            out[:, m + r] = out[:, m + r - 1] * up * f32(fac[r - 1])
        for r in range(1, m + 1):
            out[:, m - r] = out[:, m - r + 1] * down * f32(fac[r - 1])
        return out

    def emit(self, z: Any, k: int, scale: Any = None, ldexp: bool = False) -> list[Any]:
        """The K basis values of the float32 TIR value ``z`` (inside the caller's vectorized lane loop), times
        ``scale`` where given (the middle one multiplied, the rest follow by the ratios). ``ldexp``: the exps
        as ``_exp_scaled`` (x86 AVX-512)."""
        from tvm.script.ir_builder import tirx as T

        delta, m, fac = self._parts(k)
        s = T.max(T.min((z - T.float32(self.c0)) * T.float32(self.a), T.float32((k - 1) * delta + GAUSS_REACH)),
                  T.float32(-GAUSS_REACH))
        t = T.bind(s - T.float32(m * delta))
        up = T.bind(_exp_scaled(T.float32(2 * delta) * t, ldexp))
        down = T.bind(_exp_scaled(T.float32(-2 * delta) * t, ldexp))
        out: list[Any] = [None] * k
        mid = _exp_scaled(T.max(-(t * t), T.float32(-87.3365447504019)), ldexp)
        out[m] = T.bind(mid if scale is None else mid * scale)
        for r in range(1, k - m):
            out[m + r] = T.bind(out[m + r - 1] * up * T.float32(fac[r - 1]))
        for r in range(1, m + 1):
            out[m - r] = T.bind(out[m - r + 1] * down * T.float32(fac[r - 1]))
        return out

    def emit_range(self, z: Any, k: int) -> tuple[Any, Any]:
        """(an upper, a lower bound) of the K values for z: the Gaussian of the nearest center, exp(-t^2) at its
        distance (as its exponent -t^2, the exp taken once after the reduction: ``range_value``), the largest in
        exact arithmetic (``emit``'s ratio form agrees to a few ulps: a value above the bound by that much still
        quantizes to 255), and 0 below (every value is positive)."""
        from tvm.script.ir_builder import tirx as T

        delta = self.dc * self.a
        s = T.bind(T.max(T.min((z - T.float32(self.c0)) * T.float32(self.a), T.float32((k - 1) * delta + GAUSS_REACH)),
                         T.float32(-GAUSS_REACH)))
        m = T.max(T.min(T.round(s * T.float32(1 / delta)), T.float32(k - 1)), T.float32(0))
        t = T.bind(s - m * T.float32(delta))
        return -(t * t), T.float32(0)  # the exponent: the largest value's is the largest (``range_value``)

    positive = True  # every value is a product of exps: >= 0, its lower bound 0, so its zero point 0

    def denormals(self, k: int) -> bool:
        """Whether a value can come out below FLT_MIN (the farthest center beyond exp(-87))."""
        return (GAUSS_REACH + (k - 1) * self.dc * self.a) ** 2 > 87.0

    def exps_in_range(self, k: int) -> bool:
        """Whether the ratios exp(+-2 delta t) stay finite without a clamp (the scaled input is clamped: |t| is
        at most GAUSS_REACH + the larger count of centers on one side of the middle one, times delta)."""
        delta, m, _ = self._parts(k)
        return 2 * delta * (GAUSS_REACH + max(m, k - 1 - m) * delta) < 80.0

    def range_value(self, hi: Any) -> Any:
        """The bound of ``emit_range``'s reduced upper key: one exp for the whole call, not one per feature."""
        return fast_exp(hi)


def gaussian_rbf(g: BasisGraph, k: int) -> GaussianRbf | None:
    """The ratio form of ``g`` when it computes K Gaussians on evenly spaced centers (FastKAN's
    ``exp(-((z - c) * a)^2)``, or any other form of it): centers from an evenly spaced constant of width K, the
    width from the graph's value one center spacing away, checked against the graph on a dense sweep."""
    for nd in g.nodes:
        if nd.kind != CONST or nd.width != k or k < 2:
            continue
        c = np.asarray(nd.values, np.float64)
        dc = float(c[1] - c[0])
        if dc <= 0 or not np.allclose(np.diff(c), dc, rtol=1e-5, atol=0):
            continue
        probe = evaluate_basis(g, k, np.asarray([c[0], c[0] + dc], np.float32))
        if not (abs(float(probe[0, 0]) - 1) < 1e-6 and 0 < float(probe[1, 0]) < 1):
            continue
        delta = float(np.sqrt(-np.log(float(probe[1, 0]))))
        if (2 * k - 1) * delta * delta > GAUSS_MAX_EXPONENT:
            continue
        rbf = GaussianRbf(float(c[0]), dc, delta / dc)
        z = np.concatenate([np.linspace(c[0] - 4 * dc, c[-1] + 4 * dc, 4001), c]).astype(np.float32)
        if np.all(np.abs(rbf.values(z, k) - evaluate_basis(g, k, z)) <= BSPLINE_TOLERANCE):
            return rbf
    return None


def emit_features(g: BasisGraph, k: int, n: int, lanes: int, z: Any, v: Any, offset: int = 0,
                  ext: Any = None) -> None:
    """``v[0, offset + j*n + i] = phi_j(z[i])`` for every feature i, ``lanes`` features at a time (a tail chunk for
    the rest), every node let-bound (registers). With ``ext`` (``emit_extrema_init``), the lane-wise maximum and
    minimum of the stored values are kept in it as they are made (the quantization's extrema without another pass
    over v). A uniform B-spline basis (``uniform_bspline``) is evaluated in its closed form instead of the graph,
    Gaussian RBFs on evenly spaced centers (``gaussian_rbf``) by the ratio of neighbours (3 exps, not K)."""
    from tvm.script.ir_builder import tirx as T

    s = None  # every node is let-bound: no scratch
    spline: UniformBSpline | GaussianRbf | None = uniform_bspline(g, k) or gaussian_rbf(g, k)
    chunks, rem = n // lanes, n % lanes
    for count, width in ((chunks, lanes), (1 if rem else 0, rem)):
        if count == 0:
            continue
        start = 0 if width == lanes else chunks * lanes
        with T.serial(0, count) as ci:
            base = start + ci * width
            with T.vectorized(0, width) as lane:
                if spline is not None:
                    vals = spline.emit(z[base + lane], k)
                else:
                    phi = emit_basis(g, k, {}, z, s, base, lane, bind=True)
                    vals = [basis_value(phi[j], z, s, base, lane) for j in range(k)]
                for j in range(k):
                    T.buffer_store(v, vals[j], [0, offset + j * n + base + lane])
                if ext is not None:
                    hi, lo = ext[0, lane], ext[1, lane]
                    for j in range(k):
                        hi, lo = T.max(hi, vals[j]), T.min(lo, vals[j])
                    T.buffer_store(ext, hi, [0, lane])
                    T.buffer_store(ext, lo, [1, lane])


def _tree(op: Any, vals: list[Any]) -> Any:
    """``op`` over ``vals`` as a balanced tree (depth log2 len, not len)."""
    while len(vals) > 1:
        vals = [op(vals[i], vals[i + 1]) if i + 1 < len(vals) else vals[i] for i in range(0, len(vals), 2)]
    return vals[0]


def emit_extrema_init(lanes: int) -> Any:
    """A (2, lanes) stack buffer: row 0 lane-wise running maxima (from the lowest float), row 1 minima."""
    from tvm.script.ir_builder import tirx as T

    ext = T.alloc_buffer((2, lanes), "float32", scope=SCRATCH_SCOPE)
    with T.vectorized(lanes) as i:
        T.buffer_store(ext, T.min_value("float32"), [0, i])
        T.buffer_store(ext, T.max_value("float32"), [1, i])
    return ext


def emit_layer_norm(x: Any, gamma: Any, beta: Any, n: int, lanes: int, eps: float) -> Any:
    """A local (n,) buffer ``z = (x - mean) / sqrt(var + eps) * gamma + beta`` (mean and variance over the n
    values of x, two passes, lane-wise partial sums)."""
    from tvm.script.ir_builder import tirx as T

    f32 = "float32"
    main = n // lanes * lanes
    part = T.alloc_buffer((2, lanes), f32, scope=SCRATCH_SCOPE)
    z = T.alloc_buffer((n,), f32, scope=SCRATCH_SCOPE)
    with T.vectorized(lanes) as i:
        T.buffer_store(part, T.float32(0), [0, i])
        T.buffer_store(part, T.float32(0), [1, i])
    with T.serial(main // lanes) as o, T.vectorized(lanes) as i:
        T.buffer_store(part, part[0, i] + x[o * lanes + i], [0, i])
    with T.serial(n - main) as r:
        T.buffer_store(part, part[0, 0] + x[main + r], [0, 0])
    with T.serial(lanes - 1) as i:
        T.buffer_store(part, part[0, 0] + part[0, i + 1], [0, 0])
    mean = T.bind(part[0, 0] / T.float32(n))
    with T.serial(main // lanes) as o, T.vectorized(lanes) as i:
        d = x[o * lanes + i] - mean
        T.buffer_store(part, part[1, i] + d * d, [1, i])
    with T.serial(n - main) as r:
        d = x[main + r] - mean
        T.buffer_store(part, part[1, 0] + d * d, [1, 0])
    with T.serial(lanes - 1) as i:
        T.buffer_store(part, part[1, 0] + part[1, i + 1], [1, 0])
    inv = T.bind(T.float32(1) / T.sqrt(part[1, 0] / T.float32(n) + T.float32(eps)))
    with T.serial(main // lanes) as o, T.vectorized(lanes) as i:
        j = o * lanes + i
        T.buffer_store(z, (x[j] - mean) * inv * gamma[j] + beta[j], [j])
    with T.serial(n - main) as r:
        T.buffer_store(z, (x[main + r] - mean) * inv * gamma[main + r] + beta[main + r], [main + r])
    return z


def emit_quantized_words(isa: Any, v: Any, nk: int, quantize: Any) -> Any:
    """int8_dot's ``emit_quantized_copy`` for one row, in vectors of QUANT_LANES values (its single
    nk-wide vector loop compiles to slow code at n*K in the thousands): the (1, K4) int32 view of the
    zero-padded uint8 (sdot: shifted int8) copy of ``quantize(v)``."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    k4 = -(-nk // 4)
    scope = SCRATCH_SCOPE
    xq = T.alloc_buffer((k4 * 4,), isa.x_dtype, scope=scope)
    main = nk // QUANT_LANES * QUANT_LANES

    def put(i: Any) -> None:
        u = quantize(v[0, i])
        T.buffer_store(xq, u if not isa.x_shift else Cast("int8", Cast("int16", u) + T.int16(isa.x_shift)), [i])

    with T.serial(main // QUANT_LANES) as o, T.vectorized(QUANT_LANES) as i:
        put(o * QUANT_LANES + i)
    with T.serial(nk - main) as r:
        put(main + r)
    with T.serial(k4 * 4 - nk) as r:
        T.buffer_store(xq, T.Cast(isa.x_dtype, 0), [nk + r])
    return T.decl_buffer((1, k4), "int32", data=xq.data, scope=scope)


def emit_int8_contraction(isa_name: str, v: Any, nk: int, wp: Any, out: int, block_n: int,
                          store: Any, quantization: tuple[Any, Any] | None = None) -> None:
    """Quantize the fp32 (1, nk) ``v`` as DynamicQuantizeLinear does and multiply it by the packed int8 weight
    ``wp`` (``pack_int8(W, block_n, isa lanes)``) on the isa's dot products; ``store(acc, col, sx, zeff)`` gets
    each output column's int32 sum of ``(vq + shift) * W`` (subtract ``zeff * colsum`` for the exact
    ``(vq - zp) W``). ``quantization``: the (scale, zero point) already known (``int8_dot.quantization_of_extrema``),
    else computed from v here."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    isa = ISAS[isa_name]
    V, BN = isa.lanes, block_n
    K4 = -(-nk // 4)
    FULL, TAIL = out // BN, out % BN
    # DynamicQuantizeLinear's scale and zero point as the graph computes them; the values are multiplied by
    # 1 / scale instead of divided by it (a division per value costs more than the rest of the quantization;
    # the quotient can differ in its last bit, moving a value that lies on a rounding tie by one step)
    sx, zp = quantization if quantization is not None else emit_dynamic_quantization(v, 1, nk)[:2]
    inv = T.bind(T.float32(1) / sx)
    zpf = T.bind(Cast("float32", zp))

    def quantize(e: Any) -> Any:
        return Cast("uint8", T.max(T.min(T.round(e * inv) + zpf, T.float32(255)), T.float32(0)))

    x32 = emit_quantized_words(isa, v, nk, quantize)
    zeff = T.bind(Cast("int32", zp) + T.int32(isa.x_shift))  # the dot multiplies vq + shift

    def block(woff: Any, col0: Any, W: int, NOUT: int) -> None:
        S = max(1, CHAINS // (W // V))  # partial sums over k: independent dot chains
        acc = T.alloc_buffer((S, W), "int32", scope=SCRATCH_SCOPE)
        with T.unroll(S) as si, T.unroll(W // V) as c:
            T.buffer_store(acc, T.Broadcast(T.int32(0), V), [si, T.Ramp(c * V, 1, V)])

        def step(si: Any, c: Any, kk: Any) -> None:
            a = acc[si, T.Ramp(c * V, 1, V)]
            w = wp[T.Ramp(woff + kk * W * 4 + c * V * 4, 1, 4 * V)]
            T.buffer_store(acc, dot4(isa, a, x32[0, kk], w), [si, T.Ramp(c * V, 1, V)])

        kmain = K4 // S * S
        with T.serial(kmain // S) as ko, T.unroll(S) as si, T.unroll(W // V) as c:
            step(si, c, ko * S + si)
        with T.serial(K4 - kmain) as kr, T.unroll(W // V) as c:
            step(0, c, kmain + kr)
        with T.unroll(S - 1) as si, T.unroll(W // V) as c:
            T.buffer_store(acc, acc[0, T.Ramp(c * V, 1, V)] + acc[si + 1, T.Ramp(c * V, 1, V)],
                           [0, T.Ramp(c * V, 1, V)])
        with T.serial(NOUT) as c:
            store(acc[0, c], col0 + c, sx, zeff)

    if FULL > 0:
        with T.serial(FULL) as nb:
            block(nb * K4 * BN * 4, nb * BN, BN, BN)
    if TAIL > 0:
        block(FULL * K4 * BN * 4, FULL * BN, tail_width(TAIL, V), TAIL)


def emit_streamed_layer(p: Int8Layer, spline: UniformBSpline | GaussianRbf, z: Any, wp: Any, out_fn: Any,
                        base: tuple[Any, Any, Any] | None = None) -> None:
    """The contraction of a streamed layer (``streamed_basis``) in one pass over its features, the basis never in
    memory: the quantization's scale and zero point first, from the bounds of the values (``emit_range``, cheap:
    no K values), then per chunk of ``lanes`` features its K values are made, quantized into a few words on the
    stack and multiplied at once by the chunk's rows of ``wp`` (``chunk_major``): no pass over an fp32 basis
    buffer, and the weight stream of one chunk can overlap the arithmetic of the next. ``out_fn(acc, col, sx,
    zeff)`` stores an output column. ``base``: (the base branch's values u (1, n) fp32 with their extrema, its
    packed weight (natural row order), its ``out_fn``), quantized and multiplied chunk by chunk alongside."""
    import tvm
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    isa = ISAS[p.isa]
    n, k, lanes, V = p.n, p.segments[0].k, p.lanes, isa.lanes
    W = p.block_n if p.out == p.block_n else tail_width(p.out, V)  # one block: every column
    S = 2  # partial sums of the spline's contraction (alternate words)

    ext = emit_extrema_init(lanes)
    main = n // lanes * lanes
    for count, width, start in ((n // lanes, lanes, 0), (1 if n % lanes else 0, n % lanes, main)):
        if count == 0:
            continue
        with T.serial(count) as ci, T.vectorized(width) as lane:
            hi, lo = spline.emit_range(z[start + ci * width + lane], k)
            T.buffer_store(ext, T.max(ext[0, lane], hi), [0, lane])
            T.buffer_store(ext, T.min(ext[1, lane], lo), [1, lane])
    with T.serial(lanes - 1) as i:
        T.buffer_store(ext, T.max(ext[0, 0], ext[0, i + 1]), [0, 0])
    hi_all = T.bind(spline.range_value(ext[0, 0]))
    with T.vectorized(lanes) as i:
        T.buffer_store(ext, hi_all, [0, i])
    quants = [quantization_of_extrema(ext, lanes)]
    if base is not None:
        quants.append(quantization_of_extrema(base[0][1], lanes))

    def quantizer(sx: Any, zp: Any) -> Any:
        inv = T.bind(T.float32(1) / sx)
        zpi = T.bind(Cast("int32", zp))

        def q(e: Any, scaled: bool = False, positive: bool = False) -> Any:
            """Zero point and clip in int32: 2 float operations, not 6; ``positive``: values >= 0 (and so a zero
            point of 0): rounded and saturated to 255 only (vnni: vcvtps2dq, vpmovusdb)."""
            v = e if scaled else e * inv
            # vnni (x86): lrint, one vcvtps2dq in the rounding mode (nearest even, as round), not a round + a cast
            r = (T.call_llvm_pure_intrin("int32", "llvm.lrint", v) if isa.name == "vnni"
                 else Cast("int32", T.round(v)))
            if positive:
                u = Cast("uint8", T.min(Cast("uint32", r), tvm.tirx.const(255, "uint32")))
            else:
                u = Cast("uint8", T.max(T.min(r + zpi, T.int32(255)), T.int32(0)))
            return u if not isa.x_shift else Cast("int8", Cast("int16", u) + T.int16(isa.x_shift))

        return q, inv, T.bind(zpi + T.int32(isa.x_shift))  # the dot multiplies vq + shift

    qs, inv_s, zeff = quantizer(*quants[0])
    ldexp = isa.name == "vnni" and spline.exps_in_range(k)
    acc = T.alloc_buffer((S, W), "int32", scope=SCRATCH_SCOPE)
    xq = T.alloc_buffer((k * lanes,), isa.x_dtype, scope=SCRATCH_SCOPE)
    x32 = T.decl_buffer((k * lanes // 4,), "int32", data=xq.data, scope=SCRATCH_SCOPE)
    if base is not None:
        qb, _, zeffb = quantizer(*quants[1])
        accb = T.alloc_buffer((1, W), "int32", scope=SCRATCH_SCOPE)
        xb = T.alloc_buffer((lanes,), isa.x_dtype, scope=SCRATCH_SCOPE)
        xb32 = T.decl_buffer((lanes // 4,), "int32", data=xb.data, scope=SCRATCH_SCOPE)
    for a in ([acc, accb] if base is not None else [acc]):
        with T.unroll(a.shape[0]) as si, T.unroll(W // V) as c:
            T.buffer_store(a, T.Broadcast(T.int32(0), V), [si, T.Ramp(c * V, 1, V)])

    def dot(a: Any, si: int, word: Any, w: Any, woff: Any) -> None:
        for c in range(W // V):
            wv = w[T.Ramp(woff + c * V * 4, 1, 4 * V)]
            T.buffer_store(a, dot4(isa, a[si, T.Ramp(c * V, 1, V)], word, wv), [si, T.Ramp(c * V, 1, V)])

    # x86: denormals flushed to 0 (FTZ, DAZ) in the chunk loop: far from every center a Gaussian ratio chain goes
    # below FLT_MIN (a microcode assist per operation: 6.5 -> 7.6 us a call for the inputs that have such features);
    # such a value quantizes to 0 either way
    flush = isa.name in ("vnni", "avx2") and spline.denormals(k)
    if flush:
        csr = T.alloc_buffer((2,), "int32", scope=SCRATCH_SCOPE)
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.stmxcsr", T.address_of(csr[0])))
        T.buffer_store(csr, T.bitwise_or(csr[0], T.int32(0x8040)), [1])
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.ldmxcsr", T.address_of(csr[1])))
    for count, width, start in ((n // lanes, lanes, 0), (1 if n % lanes else 0, n % lanes, main)):
        if count == 0:
            continue
        words = -(-width // 4)
        with T.serial(count) as ci:
            f0 = start + ci * width  # the chunk's first feature
            # whole words: a tail chunk's last word is padded with the last feature's values (the weight's rows
            # there are zero); stored vectors of whole words keep the words aligned in the registers they are
            # taken from (LLVM extracts odd byte runs with instructions some x86 CPUs lack: SSE4a's extrq)
            with T.vectorized(words * 4) as lane:
                fi = f0 + lane if width % 4 == 0 else T.min(f0 + lane, n - 1)
                vals = spline.emit(z[fi], k, inv_s, ldexp)  # values already divided by the scale
                for j in range(k):
                    T.buffer_store(xq, qs(vals[j], scaled=True, positive=spline.positive), [j * words * 4 + lane])
                if base is not None:
                    T.buffer_store(xb, qb(base[0][0][0, fi]), [lane])
            row0 = k * f0  # the chunk's first row of wp (chunk_major; f0 is a multiple of 4)
            # a loop over the words, not unrolled: each word is broadcast from the stack (a load), where LLVM
            # would otherwise pick the words out of the quantized vectors by shuffles (two per word)
            nw = k * words
            with T.serial(nw // S) as ko, T.unroll(S) as si:
                dot(acc, si, x32[ko * S + si], wp, (row0 + (ko * S + si) * 4) * W)
            for kk in range(nw // S * S, nw):
                dot(acc, kk % S, x32[kk], wp, (row0 + kk * 4) * W)
            if base is not None:
                for kk in range(words):
                    dot(accb, 0, xb32[kk], base[1], (f0 + kk * 4) * W)
    if flush:
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.ldmxcsr", T.address_of(csr[0])))
    with T.unroll(W // V) as c:
        T.buffer_store(acc, acc[0, T.Ramp(c * V, 1, V)] + acc[1, T.Ramp(c * V, 1, V)], [0, T.Ramp(c * V, 1, V)])
    with T.serial(p.out) as c:
        out_fn(acc[0, c], c, quants[0][0], zeff)
    if base is not None:
        with T.serial(p.out) as c:
            base[2](accb[0, c], c, quants[1][0], zeffb)


def fused_kan_int8_kernel(p: Int8Layer, then: tuple[Int8Layer, ...] = ()) -> Any:
    """PrimFunc ``(x[x_shape] f32, [gamma[n], beta[n] f32,] [idx[n_s] int32 per gathered segment,] wp[packed] int8,
    colsum[out] int32, wscale[out] f32, b[out or 1] f32, [wpb, colsum_b, wscale_b, b_b: the same for the base
    branch,] [the same arguments for each layer of ``then``,] y[y_shape] f32)``: the whole dynamic-int8 KAN layer
    (and the layers ``then`` after it, each taking the previous one's output from the stack: one call for a chain
    of layers), ONNX semantics of the int8 pass's graph:

        z = LayerNorm(x) (``norm_eps``) or x
        v = phi(z) (n*K values, fp32, in basis-major order j*n + i; per segment: its basis of z[idx], its
            values after the previous segments')
        sx, zp = DynamicQuantizeLinear's scale and zero point of v; vq = quantize(v) (uint8)
        y[c] = float(sum_r (vq[r] - zp) W[r, c]) * (sx * wscale[c]) [+ b[c]]
        [+ the same for u = S(x) by Wb, with its own scale and zero point, + b_b[c]  (``base``)]

    with ``wp`` = ``pack_int8(int8_weight_rows(p, W), block_n, isa lanes)`` and ``colsum`` its column sums (the base
    weight packed as it is). A layer with a closed-form basis (``streamed_basis``: uniform B-splines, Gaussian RBFs)
    is streamed (``emit_streamed_layer``): scale and zero point from the values' bounds first, then each chunk of
    features evaluated, quantized and multiplied at once, the basis never in memory. Any other basis is evaluated
    vectorised across features into an fp32 scratch (L1), quantized as the graph does (int8_dot's
    ``emit_dynamic_quantization``), then multiplied; both on the CPU's int8 dot products (``dot4``)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    f32 = "float32"
    layers = (p, *then)
    for a, b in pairwise(layers):
        if b.n != a.out:
            raise ValueError(f"a chained int8 KAN layer takes {b.n} features, the previous one makes {a.out}")
    with IRBuilder() as ib, T.prim_func():
        T.func_name("kan_fused_i8")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME_INT8, "tirx.is_scheduled": True})
        xg = T.arg("x", T.buffer(p.x_shape, f32))
        args = [_layer_args(q, f"_{i}" if i else "") for i, q in enumerate(layers)]
        yg = T.arg("y", T.buffer(layers[-1].y_shape, f32))
        x = T.decl_buffer((p.n,), f32, data=xg.data)
        for i, (q, a) in enumerate(zip(layers, args, strict=True)):
            last = i == len(layers) - 1
            y = T.decl_buffer((q.out,), f32, data=yg.data) if last else \
                T.alloc_buffer((q.out,), f32, scope=SCRATCH_SCOPE)
            _emit_layer(q, a, x, y)
            x = y
    return ib.get()


def _layer_args(p: Int8Layer, suffix: str) -> dict[str, Any]:
    """Declare one layer's constant arguments (``fused_kan_int8_kernel``), names ending in ``suffix``."""
    from tvm.script.ir_builder import tirx as T

    f32, n, out = "float32", p.n, p.out
    a: dict[str, Any] = {}
    if p.norm_eps is not None:
        a["gamma"] = T.arg("gamma" + suffix, T.buffer((n,), f32))
        a["beta"] = T.arg("beta" + suffix, T.buffer((n,), f32))
    a["idx"] = [T.arg(f"idx{i}{suffix}", T.buffer((sg.n,), "int32")) if sg.gather else None
                for i, sg in enumerate(p.segments)]
    a["wp"] = T.arg("wp" + suffix, T.buffer((max(1, p.packed_size),), "int8"))
    a["cs"] = T.arg("colsum" + suffix, T.buffer((out,), "int32"))
    a["ws"] = T.arg("wscale" + suffix, T.buffer((out,), f32))
    a["bb"] = T.arg("b" + suffix, T.buffer((out if p.bias else 1,), f32))
    if p.base is not None:
        bpacked = packed_size(n, out, p.block_n, ISAS[p.isa].lanes)
        a["wpb"] = T.arg("wp_base" + suffix, T.buffer((max(1, bpacked),), "int8"))
        a["csb"] = T.arg("colsum_base" + suffix, T.buffer((out,), "int32"))
        a["wsb"] = T.arg("wscale_base" + suffix, T.buffer((out,), f32))
        a["bbb"] = T.arg("b_base" + suffix, T.buffer((out if p.base.bias else 1,), f32))
    return a


def _emit_layer(p: Int8Layer, a: dict[str, Any], x: Any, y: Any) -> None:
    """One layer's body (``fused_kan_int8_kernel``): the flat (n,) input ``x`` to the flat (out,) output ``y``."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    f32 = "float32"
    n, out, lanes = p.n, p.out, p.lanes
    nk = p.nk
    scope = SCRATCH_SCOPE
    cs, ws, bb, wp, idx = a["cs"], a["ws"], a["bb"], a["wp"], a["idx"]
    z = emit_layer_norm(x, a["gamma"], a["beta"], n, lanes, p.norm_eps) if p.norm_eps is not None else x
    streamed = streamed_basis(p)

    def spline_out(acc: Any, c: Any, sx: Any, zeff: Any) -> None:
        f = Cast(f32, acc - zeff * cs[c]) * (sx * ws[c])
        T.buffer_store(y, f + bb[c] if p.bias else f, [c])

    if p.base is not None:
        base = p.base
        wpb, csb, wsb, bbb = a["wpb"], a["csb"], a["wsb"], a["bbb"]

        def base_out(acc: Any, c: Any, sx: Any, zeff: Any) -> None:
            f = Cast(f32, acc - zeff * csb[c]) * (sx * wsb[c])
            T.buffer_store(y, y[c] + (f + bbb[c] if base.bias else f), [c])

        u = T.alloc_buffer((1, n), f32, scope=SCRATCH_SCOPE)
        ext_u = emit_extrema_init(lanes)
    if streamed is not None:
        if p.base is not None:
            emit_features(base.graph, 1, n, lanes, x, u, 0, ext_u)
        emit_streamed_layer(p, streamed, z, wp, spline_out,
                            ((u, ext_u), wpb, base_out) if p.base is not None else None)
        return
    v = T.alloc_buffer((1, nk), f32, scope=scope)
    ext = emit_extrema_init(lanes)
    offset = 0
    for sg, ix in zip(p.segments, idx, strict=True):
        zs = z
        if ix is not None:  # this basis's features: a constant gather of z
            zs = T.alloc_buffer((sg.n,), f32, scope=SCRATCH_SCOPE)
            with T.serial(sg.n) as i:
                T.buffer_store(zs, z[ix[i]], [i])
        emit_features(sg.graph, sg.k, sg.n, lanes, zs, v, offset, ext)
        offset += sg.n * sg.k
    emit_int8_contraction(p.isa, v, nk, wp, out, p.block_n, spline_out, quantization_of_extrema(ext, lanes))
    if p.base is not None:
        emit_features(base.graph, 1, n, lanes, x, u, 0, ext_u)
        emit_int8_contraction(p.isa, u, n, wpb, out, p.block_n, base_out, quantization_of_extrema(ext_u, lanes))


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


__all__ = ["KERNEL_NAME", "KERNEL_NAME_BF16W", "KERNEL_NAME_INT8", "MAX_OUT", "BaseBranch", "BasisGraph", "Int8Layer",
           "Segment", "basis_major", "fused_kan_int8_kernel", "fused_kan_kernel", "int8_block_n", "pack_coefficients"]
