"""The packed batch-1 dense kernel with its weights stored as bfloat16: half the bytes of the fp32 GEMV.

``y[m, n] = act(sum_k x[m, k] * W[k, n] + b[n])`` with x, b, y float32 and W bfloat16, accumulated in float32:
the result equals the fp32 GEMV over the same (bf16-exact) weights up to summation order. Every batch-1
dense layer is bound by its weight bytes: half the bytes, up to half the time where the weights stream
from L3 / DRAM.

Layout (``pack_pairs``): the blocks of ``kernels.tvm.tir.gemv.pack_weight`` (full BN-wide blocks, then a
narrow tail of TBN columns, both even), each k row of a W-wide block stored as W / 2 32-bit words, word j
holding column j in its low half and column j + W / 2 in its high half. bf16 is the upper half of an fp32,
so one word gives two fp32 weights with one shift (``w << 16``: column j) and one mask
(``w & 0xFFFF0000``: column j + W / 2): per 32 weights one load, a shift, an and and two FMAs (widening
each bf16 with a zero extension would cost two shuffles and two shifts), any x86 / ARM CPU, no
avx512_bf16 needed. Where the weights sit in L2 the fp32 GEMV is load bound and this one ALU bound, so
the gain there is smaller than the bytes.

The loop structure is the fp32 kernel's (row blocks, BN accumulators per block, split partial sums in the
narrow tail); only the weight load differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels.tvm.tir.gemv import (
    FULL_CHAINS,
    MAX_ROW_BLOCK,
    SCRATCH_SCOPE,
    TAIL_CHAINS,
    GemvParams,
    bias_relu,
    emit_sum_and_store,
    layer_kernel,
    layer_params,
    tail_chunk,
    tail_width,
)

KERNEL_NAME = "gemv-packed-bf16w"
ATTR_GEMV_BF16 = "edgec.gemv_bf16"  # PrimFunc attribute: the GemvParams of a bf16-weight GEMV kernel


def pack_pairs(bits: np.ndarray, p: GemvParams) -> np.ndarray:
    """bf16 bits (uint16) in ``pack_weight``'s layout -> uint32 words in the paired layout: per k row of a
    W-wide block, word j = column j | column j + W / 2 << 16."""
    K, BN, FULL = p.k, p.block_n, p.full_blocks
    TBN = tail_width(p.tail)
    head = bits[: FULL * K * BN].reshape(FULL * K, BN).astype(np.uint32)
    tail = bits[FULL * K * BN:].reshape(K, TBN).astype(np.uint32) if TBN else np.zeros((0, 0), np.uint32)
    words = [(blk[:, : blk.shape[1] // 2] | (blk[:, blk.shape[1] // 2:] << 16)).reshape(-1) for blk in (head, tail)]
    return np.ascontiguousarray(np.concatenate(words))


def emit_layer_bf16(p: GemvParams, x: Any, wp: Any, woff: int, b: Any, boff: int, y: Any) -> None:
    """Emit the dense layer ``p`` with ``wp`` a uint32 buffer of bf16 pairs (``pack_pairs``' layout at
    word ``wp[woff:]``), x / y (M, K) / (M, N) float32 and the bias at ``b[boff:]``."""
    from tvm.script.ir_builder import tirx as T

    M, K, BN, U = p.m, p.k, p.block_n, max(1, p.unroll)
    FULL, TAIL = p.full_blocks, p.tail
    TBN = max(1, tail_width(TAIL))
    TOFF = FULL * K * BN // 2  # in words
    ZERO = T.float32(0)
    acc_now: list[Any] = [None]  # the accumulator buffer of the block being emitted
    if BN % 2 or (TAIL and (TBN % 2 or tail_chunk(TBN) < 2)):
        raise ValueError(f"paired bf16 layout needs even block widths, got BN={BN}, tail {TBN}")

    def act(v: Any, j: Any, bias: Any) -> Any:
        return bias_relu(p, v, j, bias)

    def lo(wv: Any) -> Any:  # the word's low bf16 as fp32
        return T.reinterpret("float32", T.shift_left(wv, T.uint32(16)))

    def hi(wv: Any) -> Any:  # the word's high bf16 as fp32
        return T.reinterpret("float32", T.bitwise_and(wv, T.uint32(0xFFFF0000)))

    def mac2(s: Any, m: Any, col: Any, half: int, xv: Any, wv: Any) -> None:
        """acc[s, m, col] += x * lo(w); acc[s, m, col + half] += x * hi(w)."""
        T.buffer_store(acc_now[0], acc_now[0][s, m, col] + xv * lo(wv), [s, m, col])
        T.buffer_store(acc_now[0], acc_now[0][s, m, col + half] + xv * hi(wv), [s, m, col + half])

    RB = max(d for d in range(1, min(M, MAX_ROW_BLOCK) + 1) if M % d == 0)
    MO = M // RB
    VCF, VCT = BN, tail_chunk(TBN)
    SF = max(1, FULL_CHAINS // (RB * (BN // VCF)))
    ST = max(1, TAIL_CHAINS // (RB * (TBN // VCT)))
    KMF, KMT = K // (SF * U) * SF * U, K // (ST * U) * ST * U

    def block(bias: Any, woff: Any, col0: Any, W: int, VC: int, S: int, NOUT: int, KMAIN: int, OC: int,
              acc: Any) -> None:
        with T.serial(MO) as mo:
            with T.unroll(S) as s, T.serial(RB) as m, T.unroll(W // VC) as c, T.vectorized(VC) as i:
                T.buffer_store(acc, ZERO, [s, m, c * VC + i])
            acc_now[0] = acc
            H, VH = W // 2, VC // 2  # words per k row, words per vector chunk
            with T.serial(KMAIN // (S * U)) as ko, T.unroll(U) as ku, T.unroll(S) as s, T.serial(RB) as m, \
                    T.unroll(H // VH) as c, T.vectorized(VH) as i:
                kk = (ko * U + ku) * S + s
                mac2(s, m, c * VH + i, H, x[mo * RB + m, kk], wp[woff + kk * H + c * VH + i])
            with T.serial(K - KMAIN) as kr, T.serial(RB) as m, T.unroll(H // VH) as c, T.vectorized(VH) as i:
                mac2(0, m, c * VH + i, H, x[mo * RB + m, KMAIN + kr], wp[woff + (KMAIN + kr) * H + c * VH + i])
            emit_sum_and_store(acc, y, lambda v, j: act(v, j, bias), mo * RB, RB, W, VC, S, NOUT, col0)

    acc = T.alloc_buffer((SF, RB, BN), "float32", scope=SCRATCH_SCOPE)
    bv = T.decl_buffer((b.shape[0] - boff,), "float32", data=b.data, elem_offset=boff)
    with T.serial(FULL) as nb:
        block(bv, woff + nb * K * (BN // 2), nb * BN, BN, VCF, SF, BN, KMF, BN // VCF, acc)
    if TAIL > 0:
        acc_t = T.alloc_buffer((ST, RB, TBN), "float32", scope=SCRATCH_SCOPE)
        block(bv, woff + TOFF, FULL * BN, TBN, VCT, ST, TAIL, KMT, TAIL // VCT, acc_t)


def gemv_bf16_kernel(p: GemvParams) -> Any:
    """The PrimFunc ``(x[M, K] f32, wp[packed / 2] u32 bf16 pairs, b[N] f32, y[M, N] f32)`` for ``p``, marked
    hand-written."""
    return layer_kernel(p, "gemv_bf16", KERNEL_NAME, ATTR_GEMV_BF16, "uint32", p.packed_size // 2, emit_layer_bf16)


def gemv_bf16_params(func: Any) -> GemvParams | None:
    """The layer a bf16-weight GEMV PrimFunc (``gemv_bf16_kernel``'s) computes; None for any other PrimFunc."""
    return layer_params(func, KERNEL_NAME, ATTR_GEMV_BF16)


__all__ = ["ATTR_GEMV_BF16", "KERNEL_NAME", "emit_layer_bf16", "gemv_bf16_kernel", "gemv_bf16_params", "pack_pairs"]
