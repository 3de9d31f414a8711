"""Batch-1 dense (GEMV-shaped) kernel with a packed weight layout, written as low-level TIR (IRBuilder).

``y[m, n] = act(sum_k x[m, k] * W[k, n] + b[n])`` for a constant ``W`` of shape (K, N) and a small
row count M (1 for batch-1 inference, T for the stateless part of a spiking layer).

Packed layout (one flat constant): the full blocks ``Wf[nb, k, i] = W[k, nb * BN + i]`` followed by
the tail block ``Wt[k, i] = W[k, FULL * BN + i]``, ``i < TBN`` with TBN the tail width rounded up to
``TAIL_ALIGN`` (or, past 16 columns, ``TAIL_CHUNK``) columns. For one block of BN output columns the
kernel then streams ``K * BN`` contiguous floats, keeping BN accumulators (BN / lanes vector registers)
live while it walks k.
Every batch-1 dense layer is bandwidth bound, so one contiguous stream per block with no reloads of
partial sums is what wins. The tail is packed narrow (not padded to a whole BN block) because the
zero padding is streamed like real weights: a 784x71 layer with BN=64 padded to 128 columns read 80 %
more bytes than it needs (784x71 kernel: 1.5 vs 3.0 us). A narrow tail keeps few accumulators, so its
k loop is split into independent partial sums (``TAIL_CHAINS``, summed at the end): one FMA chain per
vector would wait on the FMA latency instead of the memory (784x10: 0.43 vs 0.78 us).

Vector width and block sizes come from the device profile's ``[kernels]`` table: BN must be a
multiple of the profile's fp32 lanes (AVX-512: 16, NEON: 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL

KERNEL_NAME = "gemv-packed-f32"
KERNEL_NAME_INT8 = "gemv-packed-i8"
ATTR_GEMV = "edgec.gemv"  # PrimFunc attribute: the GemvParams of a packed-GEMV kernel
MAX_ROW_BLOCK = 4  # rows sharing one pass over a weight block (4 x 64 accumulators = 16 AVX-512 registers)
# A tail of up to TAIL_CHUNK columns is padded to a multiple of TAIL_ALIGN (the narrowest fp32 vector
# of any profile, NEON's 4 lanes), a wider one to a multiple of TAIL_CHUNK, and the tail loops work in
# chunks of at most TAIL_CHUNK: LLVM kept odd-width vectors such as <48 x float> with partial sums on
# the stack (3x slower), while 4/8/16-wide pieces stay in registers on every profile.
TAIL_ALIGN = 4
TAIL_CHUNK = 16
# Independent FMA chains wanted per block (partial sums over k x vector chunks x rows). Measured on
# Zen 4 (kernel alone, interleaved): a k split in a narrow tail pays (784x10: 0.43 vs 0.78 us), in a
# full 64-wide block (4 vectors, so 4 chains already) it measured no faster (784x256, 1024x1024) and
# would spill on 16-register ISAs: full blocks keep one partial sum.
FULL_CHAINS = 1
TAIL_CHAINS = 8
# The scope of a kernel's scratch buffers (accumulators, activation copies, a chain's intermediates). TVM 0.27's
# LowerTVMBuiltin puts a "global" allocation of constant size under 1024 bytes on the stack (an alloca, which
# LLVM keeps in registers where it can) and turns every other one, "local" ones of any size included, into a
# TVMBackendAllocWorkspace / FreeWorkspace call pair: an int8 supernet chain made 25 of them per call, its
# accumulators behind heap pointers.
SCRATCH_SCOPE = "global"


def tail_width(tail: int) -> int:
    """Packed width of a tail block of ``tail`` columns (0 when there is no tail)."""
    step = TAIL_ALIGN if tail <= TAIL_CHUNK else TAIL_CHUNK
    return -(-tail // step) * step


def tail_chunk(width: int) -> int:
    """Vector width of the tail loops: the largest of TAIL_CHUNK, 8, TAIL_ALIGN dividing ``width``."""
    return next(v for v in (TAIL_CHUNK, 8, TAIL_ALIGN, 1) if width % v == 0)


@dataclass(frozen=True)
class GemvParams:
    """Shape and tiling of one dense layer."""

    m: int  # rows of x (1 for batch-1)
    k: int  # reduction length
    n: int  # output features
    block_n: int  # output columns per packed block (multiple of the vector lanes)
    unroll: int  # k unroll factor
    bias: bool = True
    relu: bool = False
    # Shapes of x / y as the graph has them (e.g. (1, 1, K)); the kernel reads them flat as (M, K) / (M, N).
    x_shape: tuple[int, ...] = ()
    y_shape: tuple[int, ...] = ()
    # Integer variant (ONNX MatMulInteger after dynamic int8 quantisation): int32 activations, int8
    # weights packed at a quarter of the fp32 bytes, int32 accumulation. Exact, so it matches bit for bit.
    x_dtype: str = "float32"
    w_dtype: str = "float32"
    acc_dtype: str = "float32"

    @property
    def blocks(self) -> int:
        return -(-self.n // self.block_n)

    @property
    def full_blocks(self) -> int:
        return self.n // self.block_n

    @property
    def tail(self) -> int:
        return self.n % self.block_n

    @property
    def packed_size(self) -> int:
        """Elements of the flat packed weight ``pack_weight`` returns."""
        return self.k * (self.full_blocks * self.block_n + tail_width(self.tail))


def choose_block_n(n: int, block_n: int, lanes: int) -> int:
    """The profile's block width, shrunk (in whole vectors) for layers narrower than one block."""
    lanes = max(1, lanes)
    bn = max(lanes, (block_n // lanes) * lanes)
    if n < bn:
        bn = max(lanes, -(-n // lanes) * lanes)
    return bn


def pack_weight(w: np.ndarray, block_n: int) -> np.ndarray:
    """(K, N) -> flat [full blocks (N // BN, K, BN), then the tail (K, tail_width(N % BN))], zero
    padded: the layout ``gemv_kernel`` reads."""
    k, n = w.shape
    full, tail = n // block_n, n % block_n
    head = w[:, : full * block_n].reshape(k, full, block_n).transpose(1, 0, 2).reshape(-1)
    tw = np.zeros((k, tail_width(tail)), dtype=w.dtype)
    tw[:, :tail] = w[:, full * block_n :]
    return np.ascontiguousarray(np.concatenate([head, tw.reshape(-1)]))


def bias_relu(p: GemvParams, v: Any, j: Any, bias: Any) -> Any:
    """A dense layer's epilogue on the accumulated value ``v`` of output column j: ``[relu](v [+ bias[j]])``."""
    from tvm.script.ir_builder import tirx as T

    if p.bias:
        v = v + bias[j]
    if p.relu:
        v = T.max(v, T.float32(0) if p.acc_dtype == "float32" else T.int32(0))
    return v


def emit_sum_and_store(acc: Any, y: Any, out: Callable[[Any, Any], Any], row0: Any, rows: int, W: int, VC: int,
                       S: int, NOUT: int, col0: Any) -> None:
    """The end of one block of a dense layer: the S partial sums of the (S, rows, W) accumulators ``acc`` added
    into the first, then columns [col0, col0 + NOUT) stored, ``y[row0 + m, j] = out(sum, j)``, in VC-wide
    vectors (the last, partial chunk of a tail as scalar stores)."""
    from tvm.script.ir_builder import tirx as T

    OC = NOUT // VC
    with T.unroll(S - 1) as s, T.serial(rows) as m, T.unroll(W // VC) as c, T.vectorized(VC) as i:
        T.buffer_store(acc, acc[0, m, c * VC + i] + acc[s + 1, m, c * VC + i], [0, m, c * VC + i])
    with T.serial(rows) as m:
        with T.unroll(OC) as c, T.vectorized(VC) as i:
            T.buffer_store(y, out(acc[0, m, c * VC + i], col0 + c * VC + i), [row0 + m, col0 + c * VC + i])
        with T.serial(NOUT - OC * VC) as i:
            T.buffer_store(y, out(acc[0, m, OC * VC + i], col0 + OC * VC + i), [row0 + m, col0 + OC * VC + i])


def emit_layer(p: GemvParams, x: Any, wp: Any, woff: int, b: Any, boff: int, y: Any) -> None:
    """Emit, into the PrimFunc the IRBuilder is building, the whole dense layer ``p``:
    ``y = act(x @ W + b)`` with x / y 2-D (M, K) / (M, N) buffers, W packed at ``wp[woff:]`` and the bias
    at ``b[boff:]``. ``gemv_kernel`` emits one layer per PrimFunc; ``kernels.tvm.tir.chain`` several."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    M, K, BN, U = p.m, p.k, p.block_n, max(1, p.unroll)
    FULL, TAIL = p.full_blocks, p.tail
    TBN = max(1, tail_width(TAIL))
    TOFF = FULL * K * BN  # where the tail block starts in the packed weight
    AT = p.acc_dtype
    ZERO = T.float32(0) if AT == "float32" else T.int32(0)

    def act(v: Any, j: Any, bias: Any) -> Any:
        return bias_relu(p, v, j, bias)

    def mac(acc_v: Any, xv: Any, wv: Any) -> Any:
        if AT == "float32":
            return acc_v + xv * wv
        return acc_v + Cast(AT, xv) * Cast(AT, wv)

    # Rows are processed RB at a time (RB x width accumulators live); the weight block is re-read per
    # row block, from cache. RB is the largest divisor of M up to MAX_ROW_BLOCK.
    RB = max(d for d in range(1, min(M, MAX_ROW_BLOCK) + 1) if M % d == 0)
    MO = M // RB
    VCF, VCT = BN, tail_chunk(TBN)  # full blocks: one BN-wide vector op (a whole number of registers)
    SF = max(1, FULL_CHAINS // (RB * (BN // VCF)))
    ST = max(1, TAIL_CHAINS // (RB * (TBN // VCT)))
    KMF, KMT = K // (SF * U) * SF * U, K // (ST * U) * ST * U

    def block(bias: Any, woff: Any, col0: Any, W: int, VC: int, S: int, NOUT: int, KMAIN: int, OC: int,
              acc: Any) -> None:
        """Columns [col0, col0 + NOUT) from the (K, W) packed block at ``woff``, W / VC vector chunks:
        S partial sums over k (k = (ko * U + ku) * S + s, up to KMAIN, then the rest into sum 0) so that
        S x rows x chunks independent FMA chains hide the FMA latency. OC = whole output chunks; the
        bias of output column j is ``bias[j]`` (the bias buffer offset by the caller)."""
        with T.serial(MO) as mo:
            with T.unroll(S) as s, T.serial(RB) as m, T.unroll(W // VC) as c, T.vectorized(VC) as i:
                T.buffer_store(acc, ZERO, [s, m, c * VC + i])
            with T.serial(KMAIN // (S * U)) as ko, T.unroll(U) as ku, T.unroll(S) as s, T.serial(RB) as m, \
                    T.unroll(W // VC) as c, T.vectorized(VC) as i:
                kk = (ko * U + ku) * S + s
                T.buffer_store(acc, mac(acc[s, m, c * VC + i], x[mo * RB + m, kk], wp[woff + kk * W + c * VC + i]),
                               [s, m, c * VC + i])
            with T.serial(K - KMAIN) as kr, T.serial(RB) as m, T.unroll(W // VC) as c, T.vectorized(VC) as i:
                T.buffer_store(acc, mac(acc[0, m, c * VC + i], x[mo * RB + m, KMAIN + kr],
                                        wp[woff + (KMAIN + kr) * W + c * VC + i]), [0, m, c * VC + i])
            emit_sum_and_store(acc, y, lambda v, j: act(v, j, bias), mo * RB, RB, W, VC, S, NOUT, col0)

    acc = T.alloc_buffer((SF, RB, BN), AT, scope=SCRATCH_SCOPE)
    bv = T.decl_buffer((b.shape[0] - boff,), AT, data=b.data, elem_offset=boff)
    with T.serial(FULL) as nb:
        block(bv, woff + nb * K * BN, nb * BN, BN, VCF, SF, BN, KMF, BN // VCF, acc)
    if TAIL > 0:
        acc_t = T.alloc_buffer((ST, RB, TBN), AT, scope=SCRATCH_SCOPE)
        block(bv, woff + TOFF, FULL * BN, TBN, VCT, ST, TAIL, KMT, TAIL // VCT, acc_t)


def layer_kernel(p: GemvParams, func_name: str, kernel: str, attr: str, w_dtype: str, w_size: int,
                 emit: Callable[..., None]) -> Any:
    """The PrimFunc ``(x[M, K], wp[w_size] w_dtype, b[N], y[M, N])`` running ``emit(p, x, wp, 0, b, 0, y)``,
    marked hand-written as ``kernel``, the layer's parameters in its attribute ``attr`` (``layer_params``)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    # The bias buffer is always a parameter (a 1-element dummy without bias) so the call
    # signature does not depend on the pattern.
    M, K, N = p.m, p.k, p.n
    with IRBuilder() as ib, T.prim_func():
        T.func_name(func_name)
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: kernel, "tirx.is_scheduled": True})
        xg = T.arg("xg", T.buffer(p.x_shape or (M, K), p.x_dtype))
        wp = T.arg("wp", T.buffer((max(1, w_size),), w_dtype))
        b = T.arg("b", T.buffer((p.n if p.bias else 1,), p.acc_dtype))
        yg = T.arg("yg", T.buffer(p.y_shape or (M, N), p.acc_dtype))
        x = T.decl_buffer((M, K), p.x_dtype, data=xg.data)  # flat 2-D views of the graph's tensors
        y = T.decl_buffer((M, N), p.acc_dtype, data=yg.data)
        emit(p, x, wp, 0, b, 0, y)
    # The layer's parameters ride along, so later passes (fuse-gemv-chains) can rebuild it.
    return ib.get().with_attr(attr, {"m": M, "k": K, "n": N, "block_n": p.block_n, "unroll": p.unroll,
                                     "bias": p.bias, "relu": p.relu, "dtype": p.acc_dtype})


def layer_params(func: Any, kernel: str, attr: str) -> GemvParams | None:
    """The float32 layer a PrimFunc ``layer_kernel`` built as ``kernel`` computes, from its attribute ``attr``;
    None for any other PrimFunc."""
    attrs = func.attrs or {}
    if str(attrs.get(ATTR_KERNEL, "")) != kernel or attr not in attrs:
        return None
    a = attrs[attr]
    if str(a["dtype"]) != "float32":
        return None
    return GemvParams(m=int(a["m"]), k=int(a["k"]), n=int(a["n"]), block_n=int(a["block_n"]),
                      unroll=int(a["unroll"]), bias=bool(a["bias"]), relu=bool(a["relu"]))


def gemv_kernel(p: GemvParams) -> Any:
    """The PrimFunc ``(x[M, K], wp[packed], b[N], y[M, N])`` for ``p``, marked hand-written."""
    kernel = KERNEL_NAME if p.acc_dtype == "float32" else KERNEL_NAME_INT8
    return layer_kernel(p, "gemv", kernel, ATTR_GEMV, p.w_dtype, p.packed_size, emit_layer)


def gemv_params(func: Any) -> GemvParams | None:
    """The float32 layer a packed-GEMV PrimFunc (``gemv_kernel``'s) computes; None for any other PrimFunc."""
    return layer_params(func, KERNEL_NAME, ATTR_GEMV)


__all__ = ["ATTR_GEMV", "KERNEL_NAME", "KERNEL_NAME_INT8", "SCRATCH_SCOPE", "TAIL_ALIGN", "GemvParams", "bias_relu",
           "choose_block_n", "emit_layer", "emit_sum_and_store", "gemv_kernel", "gemv_params", "layer_kernel",
           "layer_params", "pack_weight", "tail_chunk", "tail_width"]
