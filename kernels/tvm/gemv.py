"""Batch-1 dense (GEMV-shaped) kernel with a packed weight layout, written as low-level TIR.

``y[m, n] = act(sum_k x[m, k] * W[k, n] + b[n])`` for a constant ``W`` of shape (K, N) and a small
row count M (1 for batch-1 inference, T for the stateless part of a spiking layer).

Packed layout: ``Wp[nb, k, i] = W[k, nb * BN + i]`` with N padded up to a multiple of BN. For one
block of BN output columns the kernel then streams ``K * BN`` contiguous floats, keeping BN
accumulators (BN / lanes vector registers) live while it walks k. Every batch-1 dense layer is
bandwidth bound, so one contiguous stream per block with no reloads of partial sums is what wins.
The tail block (N % BN columns) reads the first columns of the padded last block.

Vector width and block sizes come from the device profile's ``[kernels]`` table: BN must be a
multiple of the profile's fp32 lanes (AVX-512: 16, NEON: 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KERNEL_NAME = "gemv-packed-f32"
KERNEL_NAME_INT8 = "gemv-packed-i8"
MAX_ROW_BLOCK = 4  # rows sharing one pass over a weight block (4 x 64 accumulators = 16 AVX-512 registers)


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


def choose_block_n(n: int, block_n: int, lanes: int) -> int:
    """The profile's block width, shrunk (in whole vectors) for layers narrower than one block."""
    lanes = max(1, lanes)
    bn = max(lanes, (block_n // lanes) * lanes)
    if n < bn:
        bn = max(lanes, -(-n // lanes) * lanes)
    return bn


def pack_weight(w: np.ndarray, block_n: int) -> np.ndarray:
    """(K, N) -> (ceil(N / BN), K, BN), zero padded: the layout ``gemv_kernel`` reads."""
    k, n = w.shape
    blocks = -(-n // block_n)
    padded = np.zeros((k, blocks * block_n), dtype=w.dtype)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, blocks, block_n).transpose(1, 0, 2))


def gemv_kernel(p: GemvParams) -> Any:
    """The PrimFunc ``(x[M, K], wp[NB, K, BN], b[N], y[M, N])`` for ``p``, marked hand-written."""
    from tvm.script import tirx as T

    M, K, N, BN, U = p.m, p.k, p.n, p.block_n, max(1, p.unroll)
    NB, FULL, TAIL = p.blocks, p.full_blocks, p.tail
    KO, KR = K // U, K % U
    HAS_BIAS, RELU = p.bias, p.relu

    def act(v: Any, j: Any, b: Any) -> Any:
        if HAS_BIAS:
            v = v + b[j]
        if RELU:
            v = T.max(v, ZERO)
        return v

    # The bias buffer is always a parameter (a 1-element dummy without bias) so the call
    # signature does not depend on the pattern.
    NBIAS = N if HAS_BIAS else 1
    KNAME = KERNEL_NAME if p.acc_dtype == "float32" else KERNEL_NAME_INT8
    XS = p.x_shape or (M, K)
    YS = p.y_shape or (M, N)
    XT, WT, AT = p.x_dtype, p.w_dtype, p.acc_dtype
    ZERO = T.float32(0) if AT == "float32" else T.int32(0)

    def mac(acc_v: Any, xv: Any, wv: Any) -> Any:
        if AT == "float32":
            return acc_v + xv * wv
        return acc_v + T.Cast(AT, xv) * T.Cast(AT, wv)

    # Rows are processed RB at a time (RB x BN accumulators live); the weight block is re-read per row
    # block, from cache. RB is the largest divisor of M up to MAX_ROW_BLOCK.
    RB = max(d for d in range(1, min(M, MAX_ROW_BLOCK) + 1) if M % d == 0)
    MO = M // RB

    @T.prim_func
    def gemv(
        xg: T.Buffer(XS, XT),
        wp: T.Buffer((NB, K, BN), WT),
        b: T.Buffer((NBIAS,), AT),
        yg: T.Buffer(YS, AT),
    ):
        T.func_attr({"tirx.noalias": True, "edgec.kernel": KNAME, "tirx.is_scheduled": True})
        x = T.decl_buffer((M, K), XT, data=xg.data)  # flat 2-D views of the graph's tensors
        y = T.decl_buffer((M, N), AT, data=yg.data)
        acc = T.alloc_buffer((RB, BN), AT, scope="local")
        for nb in range(FULL):
            for mo in range(MO):
                for m in range(RB):
                    for i in T.vectorized(BN):
                        acc[m, i] = ZERO
                for ko in range(KO):
                    for ku in T.unroll(U):
                        for m in range(RB):
                            for i in T.vectorized(BN):
                                acc[m, i] = mac(acc[m, i], x[mo * RB + m, ko * U + ku], wp[nb, ko * U + ku, i])
                for kr in range(KR):
                    for m in range(RB):
                        for i in T.vectorized(BN):
                            acc[m, i] = mac(acc[m, i], x[mo * RB + m, KO * U + kr], wp[nb, KO * U + kr, i])
                for m in range(RB):
                    for i in T.vectorized(BN):
                        y[mo * RB + m, nb * BN + i] = act(acc[m, i], nb * BN + i, b)
        for _t in range(1 if TAIL > 0 else 0):
            for mo in range(MO):
                for m in range(RB):
                    for i in T.vectorized(BN):
                        acc[m, i] = ZERO
                for k in range(K):
                    for m in range(RB):
                        for i in T.vectorized(BN):
                            acc[m, i] = mac(acc[m, i], x[mo * RB + m, k], wp[FULL, k, i])
                for m in range(RB):
                    for i in T.vectorized(TAIL if TAIL > 0 else 1):
                        y[mo * RB + m, FULL * BN + i] = act(acc[m, i], FULL * BN + i, b)

    return gemv


__all__ = ["KERNEL_NAME", "GemvParams", "choose_block_n", "gemv_kernel", "pack_weight"]
