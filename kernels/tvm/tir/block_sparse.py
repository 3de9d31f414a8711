"""Grouped (block-sparse) GEMV for modular layers: G2GNet's block-diagonal weights.

A modular layer's constant weight W (K, N) is mostly zero: each group of outputs reads only its own
set of inputs. Cut the outputs into blocks of BN columns (the packed-GEMV block); block ``nb`` keeps
only the rows ``k`` with a nonzero weight in its columns. Stored CSR-like over blocks:

    kptr[nb] .. kptr[nb + 1]   rows of block nb in ``kidx`` / ``wv``
    kidx[r]                    the input index of row r
    wv[r, i]                   W[kidx[r], nb * BN + i]

The kernel streams only the nonzero rows (the multiply work and the bytes both shrink by the
density), with the same BN-wide vector accumulators as the dense packed GEMV. Exact: rows dropped
are all-zero within their block. Works on any zero pattern; it pays when groups are contiguous
runs of outputs (G2GNet's layout, and what the ``modular`` pass produces).

Interleaved groups (G2GNet's "mixer" grouping: output j in group j % G) make every BN-wide block
span all groups, so no row can be dropped. ``regroup_columns`` then orders the outputs so that each
block holds outputs sharing inputs; the weight is packed in that order (``perm``) and the kernel
stores each result back at its original column (a scalar scatter of N values, cheap next to the
K x N multiply work it saves).

The int8 variant (``pack_block_sparse_int8`` / ``grouped_dot_kernel``: MatMulInteger with a uint8
activation and its zero point) runs on the CPU's int8 dot products (``kernels.tvm.tir.int8_dot``), which
take 4 consecutive k per instruction: each block keeps groups of 4 rows, either windows of 4 consecutive
inputs (one unaligned 4-byte load of x per group; a G2GNet group's own inputs are one run) or, where the
kept rows are scattered (column-granular cross-group inputs), any 4 rows gathered byte by byte; whichever
needs fewer groups. Weights of rows outside a block's kept set are zero there, so a window may include them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir.gemv import SCRATCH_SCOPE
from kernels.tvm.tir.int8_dot import ISAS, dot4, emit_dynamic_quantization, emit_quantized_copy

KERNEL_NAME = "grouped-gemv-f32"
KERNEL_NAME_INT8 = "grouped-gemv-i8"
# Windows of 4 consecutive rows are used unless they need this many times the groups of a gather.
MAX_WINDOW_OVERHEAD = 1.25


@dataclass(frozen=True)
class BlockSparse:
    """A weight in the block-row layout the kernel reads."""

    k: int
    n: int
    block_n: int
    kptr: np.ndarray  # int32 [NB + 1]
    kidx: np.ndarray  # int32 [nnz_rows]
    wv: np.ndarray  # float32 [nnz_rows, BN]
    perm: np.ndarray | None = None  # int32 [N]: packed column p is the weight's column perm[p]; None = identity

    @property
    def density(self) -> float:
        """Fraction of the dense packed rows that are kept."""
        return len(self.kidx) / max(1, (len(self.kptr) - 1) * self.k)


def regroup_columns(w: np.ndarray, block_n: int, max_n: int = 4096, max_work: int = 2 ** 28) -> np.ndarray | None:
    """An order of the output columns that puts columns with the same input support into the same
    BN-wide block (greedy: seed with the first free column, take the free columns sharing the most inputs
    with it, at least half of its own, then seed again while the block has room); None when it keeps no
    more zero rows than the identity order, when the columns have no shared-support groups, or N is large."""
    k, n = w.shape
    if n > max_n or n <= block_n:
        return None
    # Group structure means few distinct column supports (G2GNet: one per group). Unstructured sparsity
    # has ~N of them and nothing to regroup; bail out before the quadratic work unless that work is small
    # (an int8 weight's supports differ per column: small weights quantize to zero inside a group).
    uniq, inv = np.unique(np.packbits(w != 0, axis=0).T, axis=0, return_inverse=True)
    if len(uniq) > n // 4 and len(uniq) ** 2 * k > max_work:
        return None
    fu = np.unpackbits(uniq, axis=1)[:, :k].astype(np.float32)  # [U, K] distinct supports
    inv = inv.reshape(-1)
    overlap = (fu @ fu.T)[inv][:, inv]  # [N, N] inputs shared by two columns
    free = np.ones(n, dtype=bool)
    order: list[np.ndarray] = []
    while free.any():
        # Fill one block: seed with the first free column, take the free columns sharing at least half of
        # its inputs (most shared first); groups narrower than a block leave room for the next seed.
        block: list[np.ndarray] = []
        room = block_n
        while room > 0 and free.any():
            j = int(np.flatnonzero(free)[0])
            score = np.where(free, overlap[j], -1.0)
            pick = np.argsort(-score, kind="stable")[:min(room, int(free.sum()))]
            pick = pick[score[pick] >= 0.5 * overlap[j, j]]
            free[pick] = False
            room -= len(pick)
            block.append(pick)
        order.append(np.sort(np.concatenate(block)))
    perm = np.concatenate(order)

    def rows(p: np.ndarray) -> int:
        return sum(int(np.any(w[:, p[b:b + block_n]] != 0, axis=1).sum()) for b in range(0, n, block_n))

    return perm.astype(np.int32) if rows(perm) < rows(np.arange(n)) else None


def pack_block_sparse(w: np.ndarray, block_n: int, perm: np.ndarray | None = None) -> BlockSparse:
    """(K, N) -> block-row layout; zero padded to whole blocks. With ``perm`` the columns are packed
    in that order (see ``regroup_columns``) and the kernel scatters results back."""
    if perm is not None:
        w = w[:, perm]
    k, n = w.shape
    nb = -(-n // block_n)
    padded = np.zeros((k, nb * block_n), dtype=np.float32)
    padded[:, :n] = w
    blocks = padded.reshape(k, nb, block_n)
    kptr = [0]
    idx: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for b in range(nb):
        rows = np.nonzero(np.any(blocks[:, b, :] != 0, axis=1))[0]
        if len(rows) == 0:  # keep one zero row so every block has a defined (zero) result
            rows = np.array([0])
        idx.append(rows.astype(np.int32))
        vals.append(blocks[rows, b, :])
        kptr.append(kptr[-1] + len(rows))
    return BlockSparse(k, n, block_n, np.asarray(kptr, np.int32), np.concatenate(idx),
                       np.ascontiguousarray(np.concatenate(vals), dtype=np.float32),
                       None if perm is None else np.asarray(perm, np.int32))


def grouped_gemv_kernel(bs: BlockSparse, rows: int, bias: bool, relu: bool, x_shape: tuple[int, ...] = (),
                        y_shape: tuple[int, ...] = ()) -> Any:
    """PrimFunc ``(x[M, K], kptr, kidx, wv, b, oidx, y[M, N])`` for the packed weight ``bs``. The bias
    ``b`` is in packed column order; ``oidx`` (``bs.perm``, or one unused element) maps each packed
    column to the output column it is stored at."""
    from tvm.script import tirx as T

    M, K, N, BN = rows, bs.k, bs.n, bs.block_n
    NB = len(bs.kptr) - 1
    NNZ = len(bs.kidx)
    FULL, TAIL = N // BN, N % BN
    NBIAS = N if bias else 1
    HAS_BIAS, RELU = bias, relu
    XS, YS = x_shape or (M, K), y_shape or (M, N)
    PERM = bs.perm is not None
    NO = N if PERM else 1
    # Identity order: vector stores. Regrouped: a scalar scatter to the original columns.
    store_loop = T.serial if PERM else T.vectorized

    def col(oidx: Any, j: Any) -> Any:
        return oidx[j] if PERM else j

    def act(v: Any, j: Any, b: Any) -> Any:
        if HAS_BIAS:
            v = v + b[j]
        if RELU:
            v = T.max(v, T.float32(0))
        return v

    @T.prim_func
    def grouped_gemv(
        xg: T.Buffer(XS, "float32"),
        kptr: T.Buffer((NB + 1,), "int32"),
        kidx: T.Buffer((NNZ,), "int32"),
        wv: T.Buffer((NNZ, BN), "float32"),
        b: T.Buffer((NBIAS,), "float32"),
        oidx: T.Buffer((NO,), "int32"),
        yg: T.Buffer(YS, "float32"),
    ):
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME, "tirx.is_scheduled": True})
        x = T.decl_buffer((M, K), "float32", data=xg.data)  # flat 2-D views of the graph's tensors
        y = T.decl_buffer((M, N), "float32", data=yg.data)
        acc = T.alloc_buffer((M, BN), "float32", scope=SCRATCH_SCOPE)
        for nb in range(NB):
            for m in range(M):
                for i in T.vectorized(BN):
                    acc[m, i] = T.float32(0)
            for r in range(kptr[nb], kptr[nb + 1]):
                for m in range(M):
                    for i in T.vectorized(BN):
                        acc[m, i] = acc[m, i] + x[m, kidx[r]] * wv[r, i]
            if nb < FULL:
                for m in range(M):
                    for i in store_loop(BN):
                        y[m, col(oidx, nb * BN + i)] = act(acc[m, i], nb * BN + i, b)
            else:
                for m in range(M):
                    for i in store_loop(TAIL if TAIL > 0 else 1):
                        y[m, col(oidx, FULL * BN + i)] = act(acc[m, i], FULL * BN + i, b)

    return grouped_gemv


@dataclass(frozen=True)
class BlockSparseInt8:
    """An int8 weight in groups of 4 rows per block of ``block_n`` columns (see the module docstring)."""

    k: int
    n: int
    block_n: int
    gptr: np.ndarray  # int32 [NB + 1]: groups of block nb are gptr[nb] .. gptr[nb + 1]
    # The first input of each group's window [NG] (int32), or its 4 rows [NG * 4] (gather: uint16 where K
    # allows, so one 8-byte load gives a group's 4 row indices)
    gidx: np.ndarray
    wv: np.ndarray  # int8 [NG * BN * 4]: per group, per column, the 4 weights
    colsum: np.ndarray  # int32 [NB * BN]: column sums in packed order (zero-point compensation)
    gather: bool
    perm: np.ndarray | None = None

    @property
    def blocks(self) -> int:
        return len(self.gptr) - 1

    @property
    def density(self) -> float:
        """Fraction of the dense packed rows that are streamed."""
        return 4 * int(self.gptr[-1]) / max(1, self.blocks * -(-self.k // 4) * 4)


def pack_block_sparse_int8(w: np.ndarray, block_n: int, perm: np.ndarray | None = None) -> BlockSparseInt8:
    """(K, N) int8 -> groups of 4 rows per block, windows or gathered (fewer groups wins, windows on a tie
    within MAX_WINDOW_OVERHEAD); with ``perm`` the columns are packed in that order."""
    if perm is not None:
        w = w[:, perm]
    k, n = w.shape
    nb = -(-n // block_n)
    kp = -(-k // 4) * 4
    padded = np.zeros((kp, nb * block_n), np.int8)
    padded[:k, :n] = w
    kept = []
    for b in range(nb):
        rows = np.nonzero(np.any(padded[:, b * block_n:(b + 1) * block_n] != 0, axis=1))[0]
        kept.append(rows if len(rows) else np.array([0]))
    windows = []
    for rows in kept:
        starts: list[int] = []
        for r in rows:
            if not starts or r >= starts[-1] + 4:
                starts.append(min(int(r), kp - 4))
        windows.append(starts)
    n_windows, n_gather = sum(map(len, windows)), sum(-(-len(r) // 4) for r in kept)
    gather = n_windows > MAX_WINDOW_OVERHEAD * n_gather
    gptr, gidx, vals = [0], [], []
    for b, rows in enumerate(kept):
        blk = padded[:, b * block_n:(b + 1) * block_n]
        if gather:
            idx = np.concatenate([rows, np.full(-len(rows) % 4, rows[0])]).reshape(-1, 4)
            wb = blk[idx]  # [groups, 4, BN]
            wb[:, 1:][idx[:, 1:] == idx[:, :1]] = 0  # padding rows repeat the first: zero weight
            if len(rows) % 4:
                wb[-1, len(rows) % 4:] = 0
            gidx.append(idx.reshape(-1))
        else:
            starts = np.asarray(windows[b])
            used = np.zeros(kp, bool)
            wb = np.zeros((len(starts), 4, block_n), np.int8)
            for g, s0 in enumerate(starts):  # a window shifted back to fit must not count a row twice
                fresh = ~used[s0:s0 + 4]
                wb[g][fresh] = blk[s0:s0 + 4][fresh]
                used[s0:s0 + 4] = True
            gidx.append(starts)
        vals.append(wb.transpose(0, 2, 1).reshape(-1))  # [groups, BN, 4]
        gptr.append(gptr[-1] + len(wb))
    colsum = padded.astype(np.int32).sum(axis=0).astype(np.int32)
    index_dtype = np.uint16 if gather and kp <= 1 << 16 else np.int32
    return BlockSparseInt8(k, n, block_n, np.asarray(gptr, np.int32), np.concatenate(gidx).astype(index_dtype),
                           np.ascontiguousarray(np.concatenate(vals), dtype=np.int8), colsum, gather,
                           None if perm is None else np.asarray(perm, np.int32))


def grouped_dot_kernel(bs: BlockSparseInt8, rows: int, isa_name: str, x_shape: tuple[int, ...] = (),
                       y_shape: tuple[int, ...] = (), dynamic: bool = False, bias: bool = False,
                       relu: bool = False) -> Any:
    """PrimFunc ``(xq[M, K] uint8, zp[] uint8, gptr, gidx, wv, colsum, oidx, y[M, N] int32)``: MatMulInteger
    of ``xq`` (zero point ``zp``) by the block-sparse int8 weight ``bs`` on ``isa_name``'s dot products;
    ``oidx`` (``bs.perm``, or one unused element) maps each packed column to its output column. ``dynamic``:
    ``(x[M, K] float32, gptr, gidx, wv, colsum, wscale, b, oidx, y[M, N] float32)``, the whole dynamic-int8
    layer (see ``kernels.tvm.tir.int8_dot.DotParams``), ``wscale`` / ``b`` in packed column order."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    isa = ISAS[isa_name]
    M, K, N, BN, V = rows, bs.k, bs.n, bs.block_n, isa.lanes
    NB, NG = bs.blocks, int(bs.gptr[-1])
    FULL, TAIL = N // BN, N % BN
    PERM = bs.perm is not None
    with IRBuilder() as ib, T.prim_func():
        T.func_name("grouped_gemv_i8")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME_INT8, "tirx.is_scheduled": True})
        XT, YT = ("float32", "float32") if dynamic else ("uint8", "int32")
        xg = T.arg("xg", T.buffer(x_shape or (M, K), XT))
        zpb = None if dynamic else T.arg("zp", T.buffer((), "uint8"))
        gptr = T.arg("gptr", T.buffer((NB + 1,), "int32"))
        gidx = T.arg("gidx", T.buffer((len(bs.gidx),), str(bs.gidx.dtype)))
        wv = T.arg("wv", T.buffer((max(1, NG * BN * 4),), "int8"))
        cs = T.arg("colsum", T.buffer((NB * BN,), "int32"))
        if dynamic:
            ws = T.arg("wscale", T.buffer((NB * BN,), "float32"))
            bb = T.arg("b", T.buffer((NB * BN if bias else 1,), "float32"))
        oidx = T.arg("oidx", T.buffer((N if PERM else 1,), "int32"))
        yg = T.arg("yg", T.buffer(y_shape or (M, N), YT))
        x = T.decl_buffer((M, K), XT, data=xg.data)
        y = T.decl_buffer((M, N), YT, data=yg.data)
        if dynamic:
            sx, zp, quantize = emit_dynamic_quantization(x, M, K)
            xq, _ = emit_quantized_copy(isa, x, M, K, quantize)
        else:
            assert zpb is not None
            zp = zpb[()]
            xq, _ = emit_quantized_copy(isa, x, M, K)
        # sum (xq - zp) w = sum (xq + shift) w - (zp + shift) colsum: the dot multiplies xq + shift
        zeff = T.bind(Cast("int32", zp) + T.int32(isa.x_shift))

        def out(v: Any, j: Any) -> Any:
            v = v - zeff * cs[j]
            if not dynamic:
                return v
            f = Cast("float32", v) * (sx * ws[j])
            if bias:
                f = f + bb[j]
            return T.max(f, T.float32(0)) if relu else f
        acc = T.alloc_buffer((M, BN), "int32", scope=SCRATCH_SCOPE)

        def word(m: Any, g: Any) -> Any:
            if not bs.gather:  # one unaligned 4-byte load
                return T.reinterpret("int32", xq[m, T.Ramp(gidx[g], 1, 4)])
            # Four scalar byte loads assembled in a general register (a vector gather of bytes became
            # 16 vpinsrb for the broadcast).
            if bs.gidx.dtype == np.uint16:  # the 4 indices in one load
                quad = T.reinterpret("int64", gidx[T.Ramp(g * 4, 1, 4)])
                rows = [Cast("int32", T.bitwise_and(T.shift_right(quad, T.int64(16 * j)), T.int64(0xFFFF)))
                        for j in range(4)]
            else:
                rows = [gidx[g * 4 + j] for j in range(4)]
            parts = [T.bitwise_and(Cast("int32", xq[m, rows[j]]), T.int32(255)) for j in range(4)]
            return parts[0] | T.shift_left(parts[1], 8) | T.shift_left(parts[2], 16) | T.shift_left(parts[3], 24)

        def block(nb: Any, nout: int) -> None:
            with T.serial(M) as m, T.unroll(BN // V) as c:
                T.buffer_store(acc, T.Broadcast(T.int32(0), V), [m, T.Ramp(c * V, 1, V)])
            with T.serial(gptr[nb], gptr[nb + 1]) as g, T.serial(M) as m:
                xw = T.bind(word(m, g))
                with T.unroll(BN // V) as c:
                    a = acc[m, T.Ramp(c * V, 1, V)]
                    T.buffer_store(acc, dot4(isa, a, xw, wv[T.Ramp(g * (BN * 4) + c * (V * 4), 1, 4 * V)]),
                                   [m, T.Ramp(c * V, 1, V)])
            loop = T.serial if PERM else T.vectorized
            with T.serial(M) as m, loop(nout) as i:
                j = nb * BN + i
                T.buffer_store(y, out(acc[m, i], j), [m, oidx[j] if PERM else j])

        with T.serial(FULL) as nb:
            block(nb, BN)
        if TAIL > 0:
            block(FULL, TAIL)
    return ib.get()


__all__ = ["KERNEL_NAME", "KERNEL_NAME_INT8", "BlockSparse", "BlockSparseInt8", "grouped_dot_kernel",
           "grouped_gemv_kernel", "pack_block_sparse", "pack_block_sparse_int8", "regroup_columns"]
