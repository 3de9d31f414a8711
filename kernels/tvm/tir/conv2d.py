"""Direct fp32 convolution kernels (NCHW in, NCHW out), written as low-level TIR (IRBuilder), for
convolutions that should run fast with no tuning.

``conv2d_kernel`` (groups = 1): register-tiled over output channels x output columns. The weight is
re-laid out at compile time as ``wp[ocb, ic, kh, kw, BOC]`` (BOC output channels per block, a whole
number of vectors; OC padded with zero filters to a multiple of BOC). For one output row ``oh`` and a tile
of ``TW`` output columns the kernel keeps ``TW x BOC`` accumulators in vector registers and walks the
whole reduction (ic, kh, kw): per step it loads BOC / lanes weight vectors and broadcasts TW input
scalars, for TW x BOC / lanes vector FMAs. The input is read as broadcast scalars, so a stride of 2 costs
nothing extra, and every weight vector is reused TW times from a register. The tile is stored
transposed into NCHW (one scalar store per output element, against IC x KH x KW multiply-adds).
Padding: a zero-padded copy of the input (IC x (H + pads) x (W + pads)) is made first, so the inner loop
has no bounds checks.

``conv2d_columns_kernel`` (groups = 1, stride 1, fewer output channels than a vector: ``columns_fit``):
vectorized over output columns instead, OC x ceil(OW / lanes) accumulators per output row, the weight broadcast
per channel. The channel-blocked kernel would pad such a layer to a whole vector of channels (Conv-KAN's first
conv, 8 channels: half of every FMA was padding; 12.9 -> 7.8 us, kernel alone, interleaved).

Both groups = 1 kernels can end in a 2x2 stride-2 max pool (``ConvParams.pool``, ``pool_fits``): two output rows
per step, column pairs maxed in registers, bias and activation after the max (monotonic per channel), only the
pooled values stored (Conv-KAN's pooled convs: the pool kernels and their calls gone, 32.4 -> 29.2 us whole net).
With an ``RbfInput`` they compute Conv-KAN's expanded input channels from the raw ones in the padded copy.

``depthwise_kernel`` (groups = C, one filter per channel): per channel and output row, a row of
accumulators vectorized over the output columns (the input read contiguously at stride 1).

Grouped convolutions with 1 < groups < C are left to the generic lowering (and "auto" tuning).

Tile sizes come from the device profile's ``[kernels]`` table (``conv_block_oc``, ``conv_tile_ow``):
TW x BOC / lanes accumulators plus BOC / lanes weight registers must fit the register file (AVX-512:
32 vectors, e.g. 14 x 32 / 16 = 28 + 2). A layer with fewer channels than the block keeps the same number of
accumulators with more columns (``tile_ow_for_block``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir._elementwise import fast_sigmoid

KERNEL_NAME = "conv2d-direct-f32"
DEPTHWISE_KERNEL_NAME = "conv2d-depthwise-f32"


@dataclass(frozen=True)
class ConvParams:
    """One 2-D convolution (NCHW / OIHW), with its epilogue and tiling."""

    n: int
    ic: int
    ih: int
    iw: int
    oc: int
    kh: int
    kw: int
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right (Relax's order)
    bias: bool = False
    relu: bool = False
    residual: bool = False  # a tensor of the output's shape added before the relu (groups = 1 only)
    pool: bool = False  # a 2x2 stride-2 max pool after the activation (the output is (OH // 2, OW // 2))
    prefetch: bool = False  # each block prefetches the next block's weights (see prefetch_fits)
    # Channel-blocked activations between direct convs (see ``stored_shape``): x arrives as (N, ceil(IC / in_block),
    # IH, IW, in_block) (0: NCHW); y, with ``blocked_out``, and r, with ``residual_blocked``, as (N, oc_blocks, OH, OW,
    # block_oc), channels past OC zero. The tile is then stored (and the residual read) as whole channel vectors.
    in_block: int = 0
    blocked_out: bool = False
    residual_blocked: bool = False
    block_oc: int = 16  # output channels per register tile (a multiple of the vector lanes)
    tile_ow: int = 8  # output columns per register tile, at most (see choose_tile_ow)
    lanes: int = 16

    @property
    def oh(self) -> int:
        return (self.ih + self.pad[0] + self.pad[2] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        return (self.iw + self.pad[1] + self.pad[3] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        """The kernel's output: the conv's, or the pooled one with ``pool``."""
        if self.pool:
            return (self.n, self.oc, self.oh // 2, self.ow // 2)
        return (self.n, self.oc, self.oh, self.ow)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The output buffer's shape: ``out_shape``, or channel-blocked with ``blocked_out``."""
        return self.blocked_shape if self.blocked_out else self.out_shape

    @property
    def blocked_shape(self) -> tuple[int, int, int, int, int]:
        """The output (or residual) of this layer channel-blocked: (N, oc_blocks, OH, OW, block_oc)."""
        return (self.n, self.oc_blocks, self.oh, self.ow, self.block_oc)

    @property
    def oc_blocks(self) -> int:
        return -(-self.oc // self.block_oc)

    @property
    def padded(self) -> bool:
        return any(self.pad)

    @property
    def mflops(self) -> float:
        return 2.0 * self.n * self.oc * self.oh * self.ow * self.ic * self.kh * self.kw / 1e6


def choose_block_oc(oc: int, block_oc: int, lanes: int) -> int:
    """The profile's output-channel block, in whole vectors, shrunk for layers with fewer channels."""
    lanes = max(1, lanes)
    boc = max(lanes, (block_oc // lanes) * lanes)
    return min(boc, -(-oc // lanes) * lanes)


def tile_ow_for_block(block_oc: int, profile_block_oc: int, profile_tile_ow: int, lanes: int) -> int:
    """The output columns of a register tile of ``block_oc`` channels: the profile's accumulator budget
    (``conv_tile_ow`` x ``conv_block_oc / lanes`` vectors) spent on more columns where a layer has fewer channels
    than the profile's block (Conv-KAN's 8 and 16 channels on AVX-512: 24 columns x 1 vector instead of 12, so
    the FMAs have enough independent accumulators to hide their latency)."""
    lanes = max(1, lanes)
    budget = max(1, profile_tile_ow) * max(1, profile_block_oc // lanes)
    return max(profile_tile_ow, budget // max(1, block_oc // lanes))


def choose_tile_ow(ow: int, tile_ow: int) -> int:
    """Output columns per register tile: the whole row when it fits, else the largest divisor of the row
    width from tile_ow / 2 up to tile_ow (no remainder tile), else tile_ow (plus one narrower tile)."""
    tile_ow = max(1, tile_ow)
    if ow <= tile_ow:
        return ow
    for t in range(tile_ow, max(1, tile_ow // 2) - 1, -1):
        if ow % t == 0:
            return t
    return tile_ow


def pack_conv_weight(w: np.ndarray, block_oc: int) -> np.ndarray:
    """(OC, IC, KH, KW) -> flat ``[ocb, ic, kh, kw, BOC]`` with OC zero-padded to a multiple of BOC: the
    layout ``conv2d_kernel`` reads."""
    oc, ic, kh, kw = w.shape
    blocks = -(-oc // block_oc)
    wpad = np.zeros((blocks * block_oc, ic, kh, kw), dtype=np.float32)
    wpad[:oc] = w
    return np.ascontiguousarray(wpad.reshape(blocks, block_oc, ic, kh, kw).transpose(0, 2, 3, 4, 1).reshape(-1))


def _act(p: ConvParams, v: Any, bias: Any, c: Any, res: Any = None) -> Any:
    from tvm.script.ir_builder import tirx as T

    if p.bias:
        v = v + bias[c]
    if res is not None:
        v = v + res
    if p.relu:
        v = T.max(v, T.float32(0))
    return v


# Scope of small scratch buffers: TVM 0.27 puts a "global" allocation under 1 KB on the stack and makes every
# "local" one a TVMBackendAllocWorkspace / FreeWorkspace pair.
ACC_SCOPE = "global"

LINE_FLOATS = 16  # float32 per 64-byte cache line
FLT_MIN = 1.17549435e-38  # the smallest normal float32


def _flush_subnormal(v: Any) -> Any:
    """0 for a subnormal float32, else ``v``. An FMA with a subnormal operand takes a microcode assist of
    ~100 cycles on Intel cores: Conv-KAN's RBF channels (exp(-d^2) with d^2 > 87) are mostly subnormal, and
    its first conv ran 20x slower on them (596 us instead of ~30 for 1 MFLOP). Flushed in the padded copy, where
    every input element passes once; the result changes by less than 1e-37 per product."""
    from tvm.script.ir_builder import tirx as T

    return T.Select(T.abs(v) < T.float32(FLT_MIN), T.float32(0), v)


@dataclass(frozen=True)
class RbfInput:
    """A Conv-KAN layer's input channels, computed in the conv's padded copy from the ``channels`` raw ones
    instead of read from an expanded tensor: first SiLU(x_c) for each c, then for each c the ``centers``
    Gaussians 2^(-(alpha_j x_c + beta_j)^2) = exp(-((alpha_j x_c + beta_j) / sqrt(log2 e))^2), j = c * centers + k
    (the BatchNorm, the center, the width and sqrt(log2 e) folded into alpha_j, beta_j: the kernel's
    ``coef[2, channels * centers]`` argument, see ``rbf_coefficients``). A Gaussian below 2^-RBF_FLUSH_EXP2
    (2.4e-38, about the smallest normal float32) is stored as exactly 0: a subnormal operand would cost each FMA
    a microcode assist (see _flush_subnormal)."""

    channels: int
    centers: int

    @property
    def expanded(self) -> int:
        return self.channels * (self.centers + 1)


RBF_FLUSH_EXP2 = 125.0  # 2^-125 = 2.4e-38: Gaussians with a larger base-2 exponent are stored as 0
LOG2E = 1.4426950408889634
# 2^f = e^(f ln 2) on [-0.5, 0.5]: Taylor to degree 6, truncation error (0.5 ln 2)^7 / 7! = 1.2e-7 relative.
_EXP2_POLY = tuple(float(np.log(2.0) ** k / np.prod(np.arange(1, k + 1))) for k in range(6, -1, -1))


def rbf_coefficients(scale: np.ndarray, shift: np.ndarray, centers: np.ndarray, width: float) -> np.ndarray:
    """coef[2, C * K] of ``RbfInput`` for exp(-(((scale_c x + shift_c) - center_k) * width)^2) (a BatchNorm as
    scale / shift per channel, then K Gaussians of that width): alpha = scale * width * sqrt(log2 e), beta =
    (shift - center) * width * sqrt(log2 e), computed in float64."""
    s = float(width) * np.sqrt(LOG2E)
    alpha = np.repeat(np.asarray(scale, np.float64) * s, len(centers))
    beta = ((np.asarray(shift, np.float64)[:, None] - np.asarray(centers, np.float64)[None, :]) * s).reshape(-1)
    return np.stack([alpha, beta]).astype(np.float32)


def _rbf_value(xv: Any, alpha: Any, beta: Any) -> Any:
    """2^(-d^2), d = alpha x + beta: n = floor(0.5 - d^2), 2^(-d^2 - n) by polynomial, 2^n through the exponent
    bits; 0 where d^2 > RBF_FLUSH_EXP2 (there n would leave the normal range: the select drops that value)."""
    import tvm
    from tvm.script.ir_builder import tirx as T

    d = xv * alpha + beta
    t = -(d * d)
    n = T.floor(t + T.float32(0.5))
    f = t - n
    poly = T.float32(_EXP2_POLY[0])
    for c in _EXP2_POLY[1:]:
        poly = poly * f + T.float32(c)
    two_n = tvm.tirx.reinterpret("float32", (tvm.tirx.Cast("int32", n) + 127) * 8388608)
    return T.Select(t < T.float32(-RBF_FLUSH_EXP2), T.float32(0), poly * two_n)


def _conv_args(p: ConvParams, rbf: RbfInput | None, suffix: str, columns: bool) -> tuple[Any, Any, Any, Any]:
    """The input arguments of a groups-1 conv kernel: x (raw channels with ``rbf``), coef (with ``rbf``, else
    None), the packed weight and the bias, named with ``suffix``."""
    from tvm.script.ir_builder import tirx as T

    first = suffix in ("", "0")
    if not first:  # a chain's later layers read the previous layer's output, not an argument
        x = None
    elif p.in_block:
        x = T.arg("x", T.buffer((p.n, -(-p.ic // p.in_block), p.ih, p.iw, p.in_block), "float32"))
    else:
        x = T.arg("x", T.buffer((p.n, rbf.channels if rbf else p.ic, p.ih, p.iw), "float32"))
    coef = T.arg("coef" + suffix, T.buffer((2, rbf.channels * rbf.centers), "float32")) if rbf else None
    boc = p.oc if columns else p.block_oc  # the column kernel's weight is one block of all channels
    wp = T.arg("wp" + suffix, T.buffer((-(-p.oc // boc) * p.ic * p.kh * p.kw * boc,), "float32"))
    b = T.arg("b" + suffix, T.buffer((bias_size(p),), "float32"))
    return x, coef, wp, b


def _output(p: ConvParams, y_shape: tuple[int, ...] | None) -> Any:
    """The output argument, of ``y_shape`` where given (the same elements as ``p.out_shape``: a reshape of the
    output folded into the kernel, e.g. a flatten before a dense layer), viewed as ``p.out_shape``."""
    from tvm.script.ir_builder import tirx as T

    if p.blocked_out:
        assert y_shape is None or tuple(y_shape) == p.stored_shape, (y_shape, p)
        return T.arg("y", T.buffer(p.stored_shape, "float32"))
    if y_shape is None or tuple(y_shape) == p.out_shape:
        return T.arg("y", T.buffer(p.out_shape, "float32"))
    assert int(np.prod(y_shape)) == int(np.prod(p.out_shape)), (y_shape, p.out_shape)
    y = T.arg("y", T.buffer(tuple(y_shape), "float32"))
    return T.decl_buffer(p.out_shape, "float32", data=y.data)


def _fill_rows(xp: Any, c0: int, count: int, hp: int, wp: int, top: int, left: int, ih: int, iw: int, lanes: int,
               value: Any) -> None:
    """Channels [c0, c0 + count) of the (channels, hp, wp) buffer xp: value(c, input row, w) for rows [top, top + ih)
    and columns [left, left + iw), zeros around it; row by row in whole vectors of ``lanes`` (a per-element bounds
    check cost 2-3 % of a 3x3 conv)."""
    from tvm.script.ir_builder import tirx as T

    right = wp - left - iw

    def fill(h: Any, c: Any, start: int, width: int, val: Any) -> None:
        """xp[c, h, start:start + width] = val(w) for w in [0, width), in vectors of ``lanes`` then the rest."""
        if width <= 0:
            return
        whole = width // lanes * lanes
        if whole:
            with T.serial(whole // lanes) as o, T.vectorized(lanes) as i:
                T.buffer_store(xp, val(o * lanes + i), [c, h, start + o * lanes + i])
        with T.serial(width - whole) as i:
            T.buffer_store(xp, val(whole + i), [c, h, start + whole + i])

    def zero(_w: Any) -> Any:
        return T.float32(0)

    with T.serial(count) as c, T.serial(hp) as h, T.If(T.And(h >= top, h < top + ih)):
        with T.Then():
            fill(h, c0 + c, 0, left, zero)
            fill(h, c0 + c, left, iw, lambda w: value(c, h - top, w))
            fill(h, c0 + c, left + iw, right, zero)
        with T.Else():
            fill(h, c0 + c, 0, wp, zero)


def _padded_input(p: ConvParams, x: Any, n: Any, ch: int, hp: int, wp: int, rbf: RbfInput | None = None,
                  coef: Any = None) -> Any:
    """A zero-padded copy of x[n] as a (ch, hp, wp) buffer (hp / wp at least the padded input; the extra
    rows / columns are zeros too), or x[n] itself viewed 3-D when there is nothing to pad. Returns the buffer and
    the channel offset of x[n] in it. Subnormal inputs are flushed to 0 in the copy (see _flush_subnormal). With
    ``rbf`` the copy computes the expanded channels from x[n]'s raw ones (``RbfInput``, coefficients in ``coef``).
    A channel-blocked input (``p.in_block``) gives a (ceil(IC / in_block), hp, wp, in_block) buffer instead."""
    from tvm.script.ir_builder import tirx as T

    lanes = max(1, p.lanes)
    top, left = p.pad[0], p.pad[1]
    if p.in_block:
        B, icb = p.in_block, -(-p.ic // p.in_block)
        if not p.padded and hp == p.ih and wp == p.iw:
            return T.decl_buffer((p.n * icb, p.ih, p.iw, B), "float32", data=x.data), n * icb
        xp = T.alloc_buffer((icb, hp, wp, B), "float32")
        # Row by row, a padded row of the blocked layout is wp * B contiguous values: the NCHW copy with wider rows.
        flat = T.decl_buffer((icb, hp, wp * B), "float32", data=xp.data)
        xf = T.decl_buffer((p.n, icb, p.ih, p.iw * B), "float32", data=x.data)
        _fill_rows(flat, 0, icb, hp, wp * B, top, left * B, p.ih, p.iw * B, lanes,
                   lambda c, r, w: _flush_subnormal(xf[n, c, r, w]))
        return xp, 0
    if rbf is None and not p.padded and hp == p.ih and wp == p.iw:
        return T.decl_buffer((p.n * ch, p.ih, p.iw), "float32", data=x.data), n * ch
    xp = T.alloc_buffer((ch, hp, wp), "float32")

    def rows(c0: int, count: int, value: Any) -> None:
        _fill_rows(xp, c0, count, hp, wp, top, left, p.ih, p.iw, lanes, value)

    if rbf is None:
        rows(0, ch, lambda c, r, w: _flush_subnormal(x[n, c, r, w]))
    else:
        K = rbf.centers
        rows(0, rbf.channels, lambda c, r, w: _flush_subnormal(x[n, c, r, w] * fast_sigmoid(x[n, c, r, w])))
        rows(rbf.channels, rbf.channels * K,
             lambda j, r, w: _rbf_value(x[n, j // K, r, w], coef[0, j], coef[1, j]))
    return xp, 0


def conv2d_kernel(p: ConvParams, rbf: RbfInput | None = None, y_shape: tuple[int, ...] | None = None) -> Any:
    """The PrimFunc ``(x[N, IC, IH, IW], wp[packed], b[OC or 1], [r[N, OC, OH, OW]], y[N, OC, OH, OW])`` for
    ``p`` (``r`` the residual, with ``p.residual``), marked hand-written."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as ib, T.prim_func():
        T.func_name("conv2d")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME, "tirx.is_scheduled": True})
        x, coef, wp, b = _conv_args(p, rbf, "", columns=False)
        r_shape = p.blocked_shape if p.residual_blocked else (p.n, p.oc, p.oh, p.ow)
        r = T.arg("r", T.buffer(r_shape, "float32")) if p.residual else None
        y = _output(p, y_shape)
        _blocked_body(p, rbf, x, coef, wp, b, r, y)
    return ib.get()


def _blocked_body(p: ConvParams, rbf: RbfInput | None, x: Any, coef: Any, wp: Any, b: Any, r: Any, y: Any) -> None:
    """The body of ``conv2d_kernel`` over the given buffers (y viewed as ``p.stored_shape``)."""
    from tvm.script.ir_builder import tirx as T

    assert not (p.pool and p.blocked_out), "a pooled output is stored NCHW"
    assert not (p.in_block and rbf is not None), "an expanded input is computed from NCHW raw channels"

    OH, OW, BOC, KH, KW, IC = p.oh, p.ow, p.block_oc, p.kh, p.kw, p.ic
    SH, SW = p.stride
    DH, DW = p.dilation
    TW = choose_tile_ow(OW, p.tile_ow)
    MAIN, REM = OW // TW, OW % TW
    full_blocks = p.oc // BOC  # blocks with every channel real; the last one may be partly padding
    hp = max(p.ih + p.pad[0] + p.pad[2], (OH - 1) * SH + (KH - 1) * DH + 1)
    wpw = max(p.iw + p.pad[1] + p.pad[3], (OW - 1) * SW + (KW - 1) * DW + 1)
    with T.serial(p.n) as n:
        xp, c0 = _padded_input(p, x, n, IC, hp, wpw, rbf, coef)

        def prefetch_next_block(ocb: Any, row: Any, ic: Any, kh: Any) -> None:
            """Software prefetch (into L2) of a share of block ocb + 1's weights at step (ic, kh) of the first tile
            of (pooled) output row ``row``: the block's cache lines spread evenly over the steps of its rows, a
            line or a few per step, so that the next block arrives while this one computes instead of all at once
            when its first row starts (``ConvParams.prefetch``)."""
            rows = OH // 2 if p.pool else OH
            lines = IC * KH * KW * BOC // LINE_FLOATS
            per = -(-lines // (rows * IC * KH))
            nxt = T.min(ocb + 1, p.oc_blocks - 1)
            step = (row * IC + ic) * KH + kh
            for j in range(per):
                line = step * per + j
                with T.If(line < lines), T.Then():
                    addr = T.address_of(wp[nxt * (IC * KH * KW * BOC) + line * LINE_FLOATS])
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", addr, T.int32(0), T.int32(2),
                                                  T.int32(1)))

        def accumulate(ocb: Any, oh: Any, ow0: Any, tw: int, prefetch_row: Any = None) -> Any:
            """The accumulators of columns [ow0, ow0 + tw) of row oh for block ocb, before the epilogue; with
            ``prefetch_row`` (a row's first tile, ``p.prefetch``) also the next block's weights for that row."""
            acc = T.alloc_buffer((tw, BOC), "float32", scope="local")
            with T.unroll(tw) as t, T.vectorized(BOC) as i:
                T.buffer_store(acc, T.float32(0), [t, i])
            with T.serial(IC) as ic, T.serial(KH) as kh:
                if prefetch_row is not None:
                    prefetch_next_block(ocb, prefetch_row, ic, kh)
                with T.unroll(KW) as kw, T.unroll(tw) as t, T.vectorized(BOC) as i:
                    row, col = oh * SH + kh * DH, (ow0 + t) * SW + kw * DW
                    if p.in_block:
                        xv = xp[c0 + ic // p.in_block, row, col, ic % p.in_block]
                    else:
                        xv = xp[c0 + ic, row, col]
                    wv = wp[(((ocb * IC + ic) * KH + kh) * KW + kw) * BOC + i]
                    T.buffer_store(acc, acc[t, i] + xv * wv, [t, i])
            return acc

        def tile(ocb: Any, oh: Any, ow0: Any, tw: int, nch: int, prefetch: bool = False) -> None:
            """Columns [ow0, ow0 + tw) of row oh for the channels of block ocb (nch of them real)."""
            acc = accumulate(ocb, oh, ow0, tw, oh if prefetch else None)
            if p.blocked_out:  # whole channel vectors, padding channels included (zero weights and bias)
                with T.unroll(tw) as t, T.vectorized(BOC) as i:
                    c = ocb * BOC + i
                    res = None
                    if r is not None:
                        res = r[n, ocb, oh, ow0 + t, i] if p.residual_blocked else r[n, c, oh, ow0 + t]
                    T.buffer_store(y, _act(p, acc[t, i], b, c, res), [n, ocb, oh, ow0 + t, i])
                return
            # Constant indices only (unrolled): the accumulators stay in registers.
            with T.unroll(nch) as i, T.unroll(tw) as t:
                c = ocb * BOC + i
                res = None
                if r is not None:
                    res = r[n, ocb, oh, ow0 + t, i] if p.residual_blocked else r[n, c, oh, ow0 + t]
                T.buffer_store(y, _act(p, acc[t, i], b, c, res), [n, c, oh, ow0 + t])

        def pooled_tile(ocb: Any, oh2: Any, ow0: Any, tw: int, nch: int, prefetch: bool = False) -> None:
            """Pooled columns [ow0 / 2, (ow0 + tw) / 2) of pooled row oh2 (ow0 even): the tile of rows 2 oh2 and
            2 oh2 + 1, column pairs maxed across whole channel vectors; bias and activation after the max."""
            acc0 = accumulate(ocb, oh2 * 2, ow0, tw, oh2 if prefetch else None)
            with T.unroll(tw // 2) as u, T.vectorized(BOC) as i:  # in place: pair u in acc0's column u
                T.buffer_store(acc0, T.max(acc0[2 * u, i], acc0[2 * u + 1, i]), [u, i])
            acc1 = accumulate(ocb, oh2 * 2 + 1, ow0, tw)
            with T.unroll(tw // 2) as u, T.vectorized(BOC) as i:
                T.buffer_store(acc0, T.max(acc0[u, i], T.max(acc1[2 * u, i], acc1[2 * u + 1, i])), [u, i])
            with T.unroll(nch) as i, T.unroll(tw // 2) as u:
                c = ocb * BOC + i
                T.buffer_store(y, _act(p, acc0[u, i], b, c), [n, c, oh2, ow0 // 2 + u])

        def row_blocks(ocb: Any, nch: int) -> None:
            if p.pool:
                assert TW % 2 == 0, "pooling needs an even tile width (pool_fits)"
                with T.serial(OH // 2) as oh2:
                    pooled_tile(ocb, oh2, 0, TW, nch, p.prefetch)
                    if MAIN > 1:
                        with T.serial(MAIN - 1) as owo:
                            pooled_tile(ocb, oh2, (owo + 1) * TW, TW, nch)
                    if REM // 2:
                        pooled_tile(ocb, oh2, MAIN * TW, REM, nch)
                return
            with T.serial(OH) as oh:
                tile(ocb, oh, 0, TW, nch, p.prefetch)  # the first tile of a row apart: it may prefetch
                if MAIN > 1:
                    with T.serial(MAIN - 1) as owo:
                        tile(ocb, oh, (owo + 1) * TW, TW, nch)
                if REM:
                    tile(ocb, oh, MAIN * TW, REM, nch)

        with T.serial(full_blocks) as ocb:
            row_blocks(ocb, BOC)
        if p.oc % BOC:
            row_blocks(full_blocks, p.oc % BOC)


def conv_chain_kernel(stages: list[tuple[ConvParams, RbfInput | None]], y_shape: tuple[int, ...] | None = None) -> Any:
    """One PrimFunc running groups-1 conv layers in sequence, each one's (pooled) output the next one's input
    (raw, with an ``RbfInput``) through a scratch buffer: ``(x, [coef0], wp0, b0, [coef1], wp1, b1, ..., y)``, each
    layer as ``conv2d_columns_kernel`` or ``conv2d_kernel`` computes it (no residuals). One call instead of one per
    layer (Conv-KAN: its two layers)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    for (p, _), (q, rbf) in itertools.pairwise(stages):
        assert p.out_shape == (q.n, rbf.channels if rbf else q.ic, q.ih, q.iw), (p, q)
    assert not any(p.residual or p.in_block or p.blocked_out for p, _ in stages)
    with IRBuilder() as ib, T.prim_func():
        T.func_name("conv2d_chain")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME, "tirx.is_scheduled": True})
        args = [_conv_args(p, rbf, str(i), columns_fit(p)) for i, (p, rbf) in enumerate(stages)]
        y = _output(stages[-1][0], y_shape)
        cur = args[0][0]
        for i, ((p, rbf), (_, coef, wp, b)) in enumerate(zip(stages, args, strict=True)):
            out = y if i == len(stages) - 1 else T.alloc_buffer(p.out_shape, "float32")
            if columns_fit(p):
                _columns_body(p, rbf, cur, coef, wp, b, out)
            else:
                _blocked_body(p, rbf, cur, coef, wp, b, None, out)
            cur = out
    return ib.get()


def pool_fits(p: ConvParams) -> bool:
    """Whether the kernel for ``p`` (without ``pool``) can take a following 2x2 stride-2 max pool into its epilogue:
    no residual, and in the channel-blocked kernel an even tile width (column pairs inside one tile)."""
    if p.residual or p.oh < 2 or p.ow < 2:
        return False
    return columns_fit(p) or choose_tile_ow(p.ow, p.tile_ow) % 2 == 0


def bias_size(p: ConvParams) -> int:
    """The bias argument's length: OC, padded to whole blocks for a channel-blocked output (the epilogue adds it
    to whole channel vectors), 1 without a bias."""
    if not p.bias:
        return 1
    return p.oc_blocks * p.block_oc if p.blocked_out else p.oc


def prefetch_fits(p: ConvParams) -> bool:
    """Whether the channel-blocked kernel for ``p`` prefetches each next block's weights (``ConvParams.prefetch``):
    wherever there is a next block. In a whole model the weights of a layer are not in L2 when it starts (ResNet-18
    holds 46 MB of them), and a block's first row pass reads them faster than a core's demand misses bring them in
    (~15 GB/s measured): ResNet-18's 512-channel layers ran 1.84 ms each instead of the 1.38 ms of the same layer
    called alone; with the prefetch 1.47 ms (kernels timed in sequence on real activations)."""
    return p.oc_blocks > 1 and not columns_fit(p)


def columns_fit(p: ConvParams) -> bool:
    """Whether ``conv2d_columns_kernel`` covers ``p``: stride 1 and fewer output channels than a vector (the
    channel-blocked kernel would pad them to a whole vector: Conv-KAN's first conv has 8 of 16 lanes real)."""
    return p.stride == (1, 1) and p.oc < max(1, p.lanes) and not p.residual


def conv2d_columns_kernel(p: ConvParams, rbf: RbfInput | None = None,
                          y_shape: tuple[int, ...] | None = None) -> Any:
    """The PrimFunc ``(x[N, IC, IH, IW], wp[IC * KH * KW * OC], b[OC or 1], y[N, OC, OH, OW])`` for a stride-1
    ``p`` with few output channels (``columns_fit``), marked hand-written. Vectorized over output columns
    instead of channels: per output row, OC x ceil(OW / lanes) vector accumulators; per reduction step (ic, kh,
    kw) one vector load of the padded input row per column vector and one broadcast weight per channel. The
    weight is ``pack_conv_weight(w, OC)`` (``[ic, kh, kw, OC]``)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as ib, T.prim_func():
        T.func_name("conv2d_columns")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME, "tirx.is_scheduled": True})
        x, coef, wp, b = _conv_args(p, rbf, "", columns=True)
        y = _output(p, y_shape)
        _columns_body(p, rbf, x, coef, wp, b, y)
    return ib.get()


def _columns_body(p: ConvParams, rbf: RbfInput | None, x: Any, coef: Any, wp: Any, b: Any, y: Any) -> None:
    """The body of ``conv2d_columns_kernel`` over the given buffers (y viewed as ``p.out_shape``)."""
    from tvm.script.ir_builder import tirx as T

    assert not (p.in_block or p.blocked_out or p.residual_blocked), "the column kernel reads and writes NCHW"

    OC, OH, OW, KH, KW, IC = p.oc, p.oh, p.ow, p.kh, p.kw, p.ic
    DH, DW = p.dilation
    L = max(1, p.lanes)
    NV = -(-OW // L)
    FULL = OW // L  # column vectors stored whole; the rest of the row element by element
    hp = max(p.ih + p.pad[0] + p.pad[2], OH + (KH - 1) * DH)
    wpw = max(p.iw + p.pad[1] + p.pad[3], NV * L + (KW - 1) * DW)
    with T.serial(p.n) as n:
        xp, c0 = _padded_input(p, x, n, IC, hp, wpw, rbf, coef)

        def conv_row(oh: Any) -> Any:
            """The accumulators of output row oh, before bias and activation."""
            acc = T.alloc_buffer((OC, NV * L), "float32", scope="local")
            with T.unroll(OC) as o, T.unroll(NV) as v, T.vectorized(L) as i:
                T.buffer_store(acc, T.float32(0), [o, v * L + i])
            with T.serial(IC) as ic, T.serial(KH) as kh, T.unroll(KW) as kw, T.unroll(OC) as o, \
                    T.unroll(NV) as v, T.vectorized(L) as i:
                xv = xp[c0 + ic, oh + kh * DH, v * L + i + kw * DW]
                wv = wp[((ic * KH + kh) * KW + kw) * OC + o]
                T.buffer_store(acc, acc[o, v * L + i] + xv * wv, [o, v * L + i])
            return acc

        if not p.pool:
            with T.serial(OH) as oh:
                acc = conv_row(oh)
                with T.unroll(OC) as o:
                    if FULL:
                        with T.unroll(FULL) as v, T.vectorized(L) as i:
                            T.buffer_store(y, _act(p, acc[o, v * L + i], b, o), [n, o, oh, v * L + i])
                    if OW > FULL * L:
                        with T.serial(OW - FULL * L) as i:
                            T.buffer_store(y, _act(p, acc[o, FULL * L + i], b, o), [n, o, oh, FULL * L + i])
        else:
            # 2x2 max pool: each row's column pairs maxed (half vectors), the even row's kept on the stack,
            # the odd row's maxed with them; bias and activation after the max (both monotonic per channel).
            H2, PW = L // 2, OW // 2
            PFULL = PW // H2
            with T.serial(OH // 2) as oh2:
                acc0 = conv_row(oh2 * 2)
                # In place: pooled column c in acc0[o, c] (vector v reads columns past what v - 1 wrote).
                with T.unroll(OC) as o, T.unroll(NV) as v, T.vectorized(H2) as u:
                    T.buffer_store(acc0, T.max(acc0[o, v * L + 2 * u], acc0[o, v * L + 2 * u + 1]),
                                   [o, v * H2 + u])
                acc1 = conv_row(oh2 * 2 + 1)

                def pooled(o: Any, c: Any) -> Any:
                    v, u = c // H2, c % H2
                    m = T.max(acc1[o, v * L + 2 * u], acc1[o, v * L + 2 * u + 1])
                    return _act(p, T.max(acc0[o, c], m), b, o)

                with T.unroll(OC) as o:
                    if PFULL:
                        with T.unroll(PFULL) as v, T.vectorized(H2) as u:
                            T.buffer_store(y, pooled(o, v * H2 + u), [n, o, oh2, v * H2 + u])
                    if PW > PFULL * H2:
                        with T.serial(PW - PFULL * H2) as u:
                            T.buffer_store(y, pooled(o, PFULL * H2 + u), [n, o, oh2, PFULL * H2 + u])

def depthwise_kernel(p: ConvParams) -> Any:
    """The PrimFunc ``(x[N, C, IH, IW], w[C, KH, KW], b[C or 1], y[N, C, OH, OW])`` for a depthwise ``p``
    (p.ic == p.oc == C, one KH x KW filter per channel), marked hand-written."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    C, OH, OW, KH, KW = p.oc, p.oh, p.ow, p.kh, p.kw
    SH, SW = p.stride
    DH, DW = p.dilation
    L = max(1, p.lanes)
    owp = -(-OW // L) * L  # the accumulator row in whole vectors (the padded input covers the overhang)
    hp = max(p.ih + p.pad[0] + p.pad[2], (OH - 1) * SH + (KH - 1) * DH + 1)
    wpw = max(p.iw + p.pad[1] + p.pad[3], (owp - 1) * SW + (KW - 1) * DW + 1)
    with IRBuilder() as ib, T.prim_func():
        T.func_name("conv2d_depthwise")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: DEPTHWISE_KERNEL_NAME, "tirx.is_scheduled": True})
        x = T.arg("x", T.buffer((p.n, C, p.ih, p.iw), "float32"))
        w = T.arg("w", T.buffer((C, KH, KW), "float32"))
        b = T.arg("b", T.buffer((C if p.bias else 1,), "float32"))
        y = T.arg("y", T.buffer((p.n, C, OH, OW), "float32"))
        with T.serial(p.n) as n:
            xp, c0 = _padded_input(p, x, n, C, hp, wpw)
            with T.serial(C) as c, T.serial(OH) as oh:
                acc = T.alloc_buffer((owp,), "float32", scope="local")
                with T.serial(owp // L) as o, T.vectorized(L) as i:
                    T.buffer_store(acc, T.float32(0), [o * L + i])
                with T.serial(KH) as kh, T.unroll(KW) as kw, T.serial(owp // L) as o, T.vectorized(L) as i:
                    xv = xp[c0 + c, oh * SH + kh * DH, (o * L + i) * SW + kw * DW]
                    T.buffer_store(acc, acc[o * L + i] + xv * w[c, kh, kw], [o * L + i])
                with T.serial(OW) as ow:
                    T.buffer_store(y, _act(p, acc[ow], b, c), [n, c, oh, ow])
    return ib.get()


__all__ = ["DEPTHWISE_KERNEL_NAME", "KERNEL_NAME", "RBF_FLUSH_EXP2", "ConvParams", "RbfInput", "bias_size",
           "choose_block_oc", "choose_tile_ow", "columns_fit", "conv2d_columns_kernel", "conv2d_kernel",
           "conv_chain_kernel", "depthwise_kernel", "pack_conv_weight", "pool_fits", "prefetch_fits",
           "rbf_coefficients", "tile_ow_for_block"]
