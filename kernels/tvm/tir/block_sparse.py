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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL

KERNEL_NAME = "grouped-gemv-f32"


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


def regroup_columns(w: np.ndarray, block_n: int, max_n: int = 4096) -> np.ndarray | None:
    """An order of the output columns that puts columns with the same input support into the same
    BN-wide block (greedy: seed with the first free column, take the BN - 1 free columns sharing the
    most inputs with it); None when it keeps no more zero rows than the identity order, when the columns
    have no shared-support groups, or N is large."""
    k, n = w.shape
    if n > max_n or n <= block_n:
        return None
    # Group structure means few distinct column supports (G2GNet: one per group). Unstructured sparsity
    # has ~N of them and nothing to regroup; bail out before the quadratic work.
    uniq, inv = np.unique(np.packbits(w != 0, axis=0).T, axis=0, return_inverse=True)
    if len(uniq) > n // 4:
        return None
    fu = np.unpackbits(uniq, axis=1)[:, :k].astype(np.float32)  # [U, K] distinct supports
    inv = inv.reshape(-1)
    overlap = (fu @ fu.T)[inv][:, inv]  # [N, N] inputs shared by two columns
    free = np.ones(n, dtype=bool)
    order: list[np.ndarray] = []
    while free.any():
        j = int(np.flatnonzero(free)[0])
        score = np.where(free, overlap[j], -1.0)
        pick = np.sort(np.argsort(-score, kind="stable")[:min(block_n, int(free.sum()))])
        free[pick] = False
        order.append(pick)
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
        acc = T.alloc_buffer((M, BN), "float32", scope="local")
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


__all__ = ["KERNEL_NAME", "BlockSparse", "grouped_gemv_kernel", "pack_block_sparse", "regroup_columns"]
