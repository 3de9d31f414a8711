"""Batch-1 int8 dense kernel on the CPU's int8 dot-product instructions (ONNX MatMulInteger semantics).

``y[m, n] = sum_k (xq[m, k] - zp) * W[k, n]`` exactly, for uint8 activations ``xq`` with a runtime zero
point ``zp`` (DynamicQuantizeLinear's outputs, or QuantizeLinear's with a constant one) and a constant int8
weight W. Each instruction multiplies 4 consecutive k of one activation word by 4 weight bytes per output
column and adds the 4 products into that column's int32 lane:

- ``vnni`` (AVX-512 VNNI): ``vpdpbusd`` zmm, u8 x s8 -> s32, 16 columns per instruction;
- ``avx2`` (x86 without VNNI): ``vpmaddubsw`` (u8 x s8 pairs -> s16, saturating) then ``vpmaddwd`` by ones
  (s16 pairs -> s32), 8 columns per pair of instructions. Exact only while no pair of products can
  saturate s16: ``exact_on`` checks the weight (ONNX Runtime's reduced-range 7-bit weights always pass);
- ``sdot`` (aarch64 dotprod): ``sdot`` v.4s, s8 x s8 -> s32, 4 columns per instruction; the activations are
  shifted to int8 (``xq - 128``) and the shift folded into the zero-point compensation.

The zero point never enters the inner loop: ``sum_k (xq - zp) W = sum_k xq W - zp * colsum`` with the
weight's column sums precomputed at compile time (``zeff = zp - 128`` for sdot's shifted activations).

Packed layout (``pack_int8``): K is padded to K4 = ceil(K / 4) groups of 4 and N cut into blocks of BN
columns; full blocks ``[N // BN][K4][BN][4]``, then the tail ``[K4][TBN][4]`` with TBN the tail rounded up
to whole vectors. For one block the kernel streams ``K4 * BN * 4`` contiguous bytes (a quarter of the fp32
bytes), BN / lanes int32 accumulator vectors live, S partial sums over k to hide the instruction latency.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir.gemv import KERNEL_NAME_INT8 as KERNEL_NAME  # the packed int8 GEMV, on dot products
from kernels.tvm.tir.gemv import SCRATCH_SCOPE

MAX_ROW_BLOCK = 4  # rows sharing one pass over a weight block
FULL_CHAINS = 8  # independent accumulator chains wanted per block (k partial sums x vectors x rows)
TAIL_CHAINS = 8
LOCAL_X_BYTES = 16384  # (lif.py's) a padded activation copy up to this size in a 'local' scratch buffer


@dataclass(frozen=True)
class DotIsa:
    """One int8 dot-product instruction family."""

    name: str
    lanes: int  # int32 accumulators (output columns) per vector
    x_shift: int  # added to the uint8 activations before the dot product (sdot multiplies s8 x s8)

    @property
    def x_dtype(self) -> str:
        return "int8" if self.x_shift else "uint8"


# The families ``kernels.tvm.int8_isa`` names (a profile's CPU -> one of these, or none).
ISAS = {"vnni": DotIsa("vnni", 16, 0), "avx2": DotIsa("avx2", 8, 0), "sdot": DotIsa("sdot", 4, -128)}


def exact_on(isa: str, w: np.ndarray) -> bool:
    """Whether ``isa`` computes ``xq @ w`` exactly for every uint8 ``xq``: always for vnni / sdot; for
    avx2 when every pair of k (0-1, 2-3 of each group of 4) keeps both its positive and its negative
    weights within 128 in magnitude, so ``vpmaddubsw`` cannot saturate (255 * 128 < 2**15)."""
    if isa in ("vnni", "sdot"):
        return True
    if isa != "avx2":
        return False
    k, n = w.shape
    pad = np.zeros((-(-k // 2) * 2, n), np.int32)
    pad[:k] = w
    pairs = pad.reshape(-1, 2, n)
    pos, neg = np.maximum(pairs, 0).sum(axis=1), np.maximum(-pairs, 0).sum(axis=1)
    return bool(pos.max() <= 128 and neg.max() <= 128)


def tail_width(tail: int, lanes: int) -> int:
    return -(-tail // lanes) * lanes


def packed_size(k: int, n: int, block_n: int, lanes: int) -> int:
    k4 = -(-k // 4)
    return k4 * 4 * ((n // block_n) * block_n + tail_width(n % block_n, lanes))


def pack_int8(w: np.ndarray, block_n: int, lanes: int) -> np.ndarray:
    """(K, N) int8 -> flat [full blocks (N // BN, K4, BN, 4), then the tail (K4, TBN, 4)], zero padded."""
    k, n = w.shape
    k4 = -(-k // 4)
    full, tail = n // block_n, n % block_n
    tbn = tail_width(tail, lanes)
    wp = np.zeros((k4 * 4, full * block_n + tbn), np.int8)
    wp[:k, :n] = w
    head = wp[:, :full * block_n].reshape(k4, 4, full, block_n).transpose(2, 0, 3, 1).reshape(-1)
    tl = wp[:, full * block_n:].reshape(k4, 4, tbn).transpose(0, 2, 1).reshape(-1)
    return np.ascontiguousarray(np.concatenate([head, tl]))


def column_sums(w: np.ndarray) -> np.ndarray:
    return w.astype(np.int32).sum(axis=0).astype(np.int32)


def dot4(isa: DotIsa, acc: Any, xword: Any, wvec: Any) -> Any:
    """``acc + sum of 4 products per column``: ``acc`` int32 x lanes, ``xword`` one int32 holding 4
    activation bytes (broadcast to every column), ``wvec`` int8 x 4 * lanes (4 k per column)."""
    from tvm.script.ir_builder import tirx as T

    v = isa.lanes
    xb = T.reinterpret(f"int8x{4 * v}", T.Broadcast(xword, v))
    if isa.name == "vnni":
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, xb, wvec)
    if isa.name == "avx2":
        pairs = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", xb, wvec)
        quads = T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, T.Broadcast(T.int16(1), 16))
        return acc + quads
    if isa.name == "sdot":
        return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, xb, wvec)
    raise ValueError(f"no int8 dot product for {isa.name!r}")


def emit_quantized_copy(isa: DotIsa, x: Any, rows: int, k: int,
                        quantize: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
    """A zero-padded (rows, K4 * 4) copy of the uint8 activations in the form ``isa`` multiplies (shifted to
    int8 for sdot): (the byte buffer, its (rows, K4) int32 view, one word per group of 4 k). With
    ``quantize`` (an element of x -> its uint8 value) x is the float activation, quantized on the way."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    k4 = -(-k // 4)
    xq = T.alloc_buffer((rows, k4 * 4), isa.x_dtype, scope=SCRATCH_SCOPE)
    with T.serial(rows) as m:
        with T.vectorized(k) as i:
            u = x[m, i] if quantize is None else quantize(x[m, i])
            v = u if not isa.x_shift else Cast("int8", Cast("int16", u) + T.int16(isa.x_shift))
            T.buffer_store(xq, v, [m, i])
        with T.serial(k4 * 4 - k) as i:
            T.buffer_store(xq, T.Cast(isa.x_dtype, 0), [m, k + i])
    return xq, T.decl_buffer((rows, k4), "int32", data=xq.data, scope=SCRATCH_SCOPE)


# An elementwise step after a float layer's scale and bias: ("relu", 0, 0), or ("qdq", scale, zero point): a
# static QuantizeLinear to uint8 and its DequantizeLinear (what the int8 pass puts after each static layer).
PostOp = tuple[str, float, int]


@dataclass(frozen=True)
class DotParams:
    """Shape and tiling of one int8 dense layer."""

    m: int
    k: int
    n: int
    block_n: int
    unroll: int
    isa: str
    x_shape: tuple[int, ...] = ()
    y_shape: tuple[int, ...] = ()
    # The whole dynamic-int8 layer (ONNX Runtime's DynamicQuantizeLinear + MatMulInteger + scale [+ bias]
    # [+ relu]): float x quantized in the kernel (per tensor, TVM's importer's formulas), float y.
    dynamic: bool = False
    bias: bool = False
    relu: bool = False
    # The whole static-int8 layer (the int8 pass's integer form): float x quantized in the kernel with this
    # constant scale (> 0) and zero point, float y = post(float(MatMulInteger) * scale[j] [+ bias]).
    x_scale: float = 0.0
    x_zero: int = 0
    post: tuple[PostOp, ...] = ()

    @property
    def static(self) -> bool:
        return self.x_scale > 0

    @property
    def float_io(self) -> bool:
        """Float x in, float y out (the whole layer), not uint8 in / int32 out (MatMulInteger alone)."""
        return self.dynamic or self.static

    @property
    def packed_size(self) -> int:
        return packed_size(self.k, self.n, self.block_n, ISAS[self.isa].lanes)


def quantization_of_extrema(ext: Any, lanes: int) -> tuple[Any, Any]:
    """DynamicQuantizeLinear's (scale, uint8 zero point) from the lane-wise extrema ``ext`` ((2, lanes): maxima,
    minima), in the graph's float operations: ``scale = (max(0, max) - min(0, min)) / 255``,
    ``zp = nearbyint(clip(-min / scale, 0, 255))``."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    with T.serial(lanes - 1) as i:
        T.buffer_store(ext, T.max(ext[0, 0], ext[0, i + 1]), [0, 0])
        T.buffer_store(ext, T.min(ext[1, 0], ext[1, i + 1]), [1, 0])
    hi = T.bind(T.max(T.float32(0), ext[0, 0]))
    lo = T.bind(T.min(T.float32(0), ext[1, 0]))
    scale = T.bind((hi - lo) / T.float32(255))
    zpf = T.bind(T.nearbyint(T.max(T.min(T.float32(0) - lo / scale, T.float32(255)), T.float32(0))))
    return scale, T.bind(Cast("uint8", zpf))


def emit_dynamic_quantization(x: Any, rows: int, k: int) -> tuple[Any, Any, Callable[[Any], Any]]:
    """DynamicQuantizeLinear of the float (rows, K) buffer ``x`` as TVM imports it: (scale, uint8 zero point,
    element -> uint8). ``scale = (max(0, max x) - min(0, min x)) / 255``, ``zp = nearbyint(clip(-min / scale,
    0, 255))``, ``q = clip(round(x / scale) + zp, 0, 255)``, in the same float operations as the graph's."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    L = 16  # partial extrema per vector lane; the rest scalar
    flat = T.decl_buffer((rows * k,), "float32", data=x.data)
    main = rows * k // L * L
    ext = T.alloc_buffer((2, L), "float32", scope=SCRATCH_SCOPE)
    with T.vectorized(L) as i:
        T.buffer_store(ext, T.min_value("float32"), [0, i])
        T.buffer_store(ext, T.max_value("float32"), [1, i])
    with T.serial(main // L) as o, T.vectorized(L) as i:
        T.buffer_store(ext, T.max(ext[0, i], flat[o * L + i]), [0, i])
        T.buffer_store(ext, T.min(ext[1, i], flat[o * L + i]), [1, i])
    with T.serial(rows * k - main) as r:
        T.buffer_store(ext, T.max(ext[0, 0], flat[main + r]), [0, 0])
        T.buffer_store(ext, T.min(ext[1, 0], flat[main + r]), [1, 0])
    scale, zp = quantization_of_extrema(ext, L)

    def quantize(v: Any) -> Any:
        return Cast("uint8", T.max(T.min(T.round(v / scale) + Cast("float32", zp), T.float32(255)), T.float32(0)))

    return scale, zp, quantize


def static_quantize(scale: float, zero: int) -> Callable[[Any], Any]:
    """QuantizeLinear to uint8 with a constant scale and zero point, as TVM lowers ``relax.quantize``:
    ``clip(round(v / scale) + zero, 0, 255)``, element -> uint8."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    def quantize(v: Any) -> Any:
        q = T.round(v / T.float32(scale)) + T.float32(zero)
        return Cast("uint8", T.max(T.min(q, T.float32(255)), T.float32(0)))

    return quantize


@dataclass(frozen=True)
class ActivationPrologue:
    """What an int8 kernel's prologue leaves for its loops: the quantized activation copy, and what the
    epilogue needs to turn an int32 dot product into the layer's value (``dot_output``)."""

    xq: Any  # (rows, K4 * 4) bytes, in the form the ISA multiplies
    words: Any  # its (rows, K4) int32 view, one word per group of 4 k
    zeff: Any  # int32: the zero point as the dot products see it (zp + the ISA's shift)
    sx: Any  # the dynamic activation scale (a float32 expression), None otherwise


def emit_activation_prologue(isa: DotIsa, x: Any, rows: int, k: int, zp: Any = None, dynamic: bool = False,
                             x_scale: float = 0.0, x_zero: int = 0) -> ActivationPrologue:
    """The prologue of an int8 dense kernel, emitted into the PrimFunc being built: ``x`` (rows, K) uint8
    with the runtime zero point ``zp`` (MatMulInteger), or float quantized on the way, per tensor, either
    ``dynamic`` (DynamicQuantizeLinear) or static (``x_scale`` > 0 and ``x_zero``)."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    sx = None
    if dynamic:
        sx, zp, quantize = emit_dynamic_quantization(x, rows, k)
        xq, words = emit_quantized_copy(isa, x, rows, k, quantize)
    elif x_scale > 0:
        zp = T.uint8(x_zero)
        xq, words = emit_quantized_copy(isa, x, rows, k, static_quantize(x_scale, x_zero))
    else:
        if zp is None:
            raise ValueError("a uint8 activation needs its zero point")
        xq, words = emit_quantized_copy(isa, x, rows, k)
    # sum (xq - zp) w = sum (xq + shift) w - (zp + shift) colsum: the dot multiplies xq + shift
    zeff = T.bind(Cast("int32", zp) + T.int32(isa.x_shift))
    return ActivationPrologue(xq, words, zeff, sx)


def dot_output(pro: ActivationPrologue, v: Any, j: Any, colsum: Any, scale: Any = None, bias: Any = None,
               relu: bool = False, post: tuple[PostOp, ...] = ()) -> Any:
    """The stored value of column j from its int32 accumulator ``v``: MatMulInteger's int32 without ``scale``,
    else ``post(act(float * scale[j] (times the dynamic activation scale) [+ bias[j]]))``."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    v = v - pro.zeff * colsum[j]
    if scale is None:
        return v
    f = Cast("float32", v) * (scale[j] if pro.sx is None else pro.sx * scale[j])
    if bias is not None:
        f = f + bias[j]
    if relu:
        f = T.max(f, T.float32(0))
    for op, s, z in post:
        if op == "relu":
            f = T.max(f, T.float32(0))
        elif op == "qdq":
            q = Cast("float32", static_quantize(s, z)(f))
            f = (q - T.float32(z)) * T.float32(s)
        else:
            raise ValueError(f"unknown step after an int8 layer: {op!r}")
    return f


def emit_dot_layer(p: DotParams, x: Any, wp: Any, cs: Any, y: Any, zp: Any = None, ws: Any = None,
                   bb: Any = None, pro: ActivationPrologue | None = None) -> ActivationPrologue:
    """Emit, into the PrimFunc the IRBuilder is building, the int8 layer ``p``: x / y (M, K) / (M, N)
    buffers, the ``pack_int8`` weight in ``wp``, its column sums in ``cs``; MatMulInteger of uint8 x with
    the zero point ``zp``, or (``p.float_io``) the whole layer with the per-column scales ``ws`` and bias
    ``bb``. ``pro``: x already quantized as this layer quantizes it (by an earlier layer reading the same x),
    so no prologue. Returns the prologue. ``dot_kernel`` emits one layer per PrimFunc; ``kernels.tvm.tir.chain``
    several."""
    from tvm.script.ir_builder import tirx as T

    isa = ISAS[p.isa]
    M, K, N, BN, U, V = p.m, p.k, p.n, p.block_n, max(1, p.unroll), isa.lanes
    K4 = -(-K // 4)
    FULL, TAIL = N // BN, N % BN
    TBN = max(V, tail_width(TAIL, V))
    RB = max(d for d in range(1, min(M, MAX_ROW_BLOCK) + 1) if M % d == 0)
    MO = M // RB
    SF = max(1, FULL_CHAINS // (RB * (BN // V)))
    ST = max(1, TAIL_CHAINS // (RB * (TBN // V)))
    if pro is None:
        pro = emit_activation_prologue(isa, x, M, K, zp, p.dynamic, p.x_scale, p.x_zero)
    x32 = pro.words

    def out(v: Any, j: Any) -> Any:
        if not p.float_io:
            return dot_output(pro, v, j, cs)
        return dot_output(pro, v, j, cs, ws, bb if p.bias else None, p.relu, p.post)

    def block(woff: Any, col0: Any, W: int, S: int, NOUT: int, acc: Any) -> None:
        KMAIN = K4 // (S * U) * S * U
        OC = NOUT // V
        with T.serial(MO) as mo:
            with T.unroll(S) as s, T.serial(RB) as m, T.unroll(W // V) as c:
                T.buffer_store(acc, T.Broadcast(T.int32(0), V), [s, m, T.Ramp(c * V, 1, V)])

            def step(s: Any, m: Any, c: Any, kk: Any) -> None:
                a = acc[s, m, T.Ramp(c * V, 1, V)]
                w = wp[T.Ramp(woff + kk * W * 4 + c * V * 4, 1, 4 * V)]
                T.buffer_store(acc, dot4(isa, a, x32[mo * RB + m, kk], w), [s, m, T.Ramp(c * V, 1, V)])

            with T.serial(KMAIN // (S * U)) as ko, T.unroll(U) as ku, T.unroll(S) as s, T.serial(RB) as m, \
                    T.unroll(W // V) as c:
                step(s, m, c, (ko * U + ku) * S + s)
            with T.serial(K4 - KMAIN) as kr, T.serial(RB) as m, T.unroll(W // V) as c:
                step(0, m, c, KMAIN + kr)
            with T.unroll(S - 1) as s, T.serial(RB) as m, T.unroll(W // V) as c:
                T.buffer_store(acc, acc[0, m, T.Ramp(c * V, 1, V)] + acc[s + 1, m, T.Ramp(c * V, 1, V)],
                               [0, m, T.Ramp(c * V, 1, V)])
            with T.serial(RB) as m:
                with T.unroll(OC) as c, T.vectorized(V) as i:
                    j = col0 + c * V + i
                    T.buffer_store(y, out(acc[0, m, c * V + i], j), [mo * RB + m, j])
                with T.serial(NOUT - OC * V) as i:
                    j = col0 + OC * V + i
                    T.buffer_store(y, out(acc[0, m, OC * V + i], j), [mo * RB + m, j])

    if FULL > 0:
        acc = T.alloc_buffer((SF, RB, BN), "int32", scope=SCRATCH_SCOPE)
        with T.serial(FULL) as nb:
            block(nb * K4 * BN * 4, nb * BN, BN, SF, BN, acc)
    if TAIL > 0:
        acc_t = T.alloc_buffer((ST, RB, TBN), "int32", scope=SCRATCH_SCOPE)
        block(FULL * K4 * BN * 4, FULL * BN, TBN, ST, TAIL, acc_t)
    return pro


ATTR_DOT = "edgec.dot"  # PrimFunc attribute: the DotParams of a whole-layer int8 kernel, as JSON


def dot_kernel(p: DotParams) -> Any:
    """The PrimFunc ``(xq[M, K] uint8, zp[] uint8, wp[packed] int8, colsum[N] int32, y[M, N] int32)``:
    MatMulInteger of ``xq`` (zero point ``zp``) by the weight ``pack_int8`` packed, with ``colsum`` its
    column sums. ``p.float_io``: ``(x[M, K] float32, wp, colsum, wscale[N] float32, b[N or 1] float32,
    y[M, N] float32)``, the whole layer ``post(act(float(MatMulInteger(q(x), W)) * scale + b))`` with the
    dynamic ``scale = sx * wscale`` or the static ``wscale``; it carries its ``DotParams`` (``dot_params``)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    M, K, N = p.m, p.k, p.n
    with IRBuilder() as ib, T.prim_func():
        T.func_name("gemv_i8")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME, "tirx.is_scheduled": True})
        XT, YT = ("float32", "float32") if p.float_io else ("uint8", "int32")
        xg = T.arg("xg", T.buffer(p.x_shape or (M, K), XT))
        zpb = None if p.float_io else T.arg("zp", T.buffer((), "uint8"))
        wp = T.arg("wp", T.buffer((max(1, p.packed_size),), "int8"))
        cs = T.arg("colsum", T.buffer((N,), "int32"))
        ws = bb = None
        if p.float_io:
            ws = T.arg("wscale", T.buffer((N,), "float32"))
            bb = T.arg("b", T.buffer((N if p.bias else 1,), "float32"))
        yg = T.arg("yg", T.buffer(p.y_shape or (M, N), YT))
        x = T.decl_buffer((M, K), XT, data=xg.data)
        y = T.decl_buffer((M, N), YT, data=yg.data)
        emit_dot_layer(p, x, wp, cs, y, None if zpb is None else zpb[()], ws, bb)
    func = ib.get()
    return func.with_attr(ATTR_DOT, json.dumps(dataclasses.asdict(p))) if p.float_io else func


def dot_params(func: Any) -> DotParams | None:
    """The whole int8 layer (float in, float out) a ``dot_kernel`` PrimFunc computes; None for any other."""
    attrs = func.attrs or {}
    if str(attrs.get(ATTR_KERNEL, "")) != KERNEL_NAME or ATTR_DOT not in attrs:
        return None
    d = json.loads(str(attrs[ATTR_DOT]))
    d["x_shape"], d["y_shape"] = tuple(d["x_shape"]), tuple(d["y_shape"])
    d["post"] = tuple((str(op), float(s), int(z)) for op, s, z in d["post"])
    return DotParams(**d)


__all__ = ["ATTR_DOT", "ISAS", "KERNEL_NAME", "ActivationPrologue", "DotIsa", "DotParams", "PostOp", "column_sums",
           "dot4", "dot_kernel", "dot_output", "dot_params", "emit_activation_prologue", "emit_dot_layer",
           "emit_quantized_copy", "exact_on", "pack_int8", "packed_size", "static_quantize"]
