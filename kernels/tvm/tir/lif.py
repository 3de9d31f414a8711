"""Fused LIF over T steps: the whole membrane recurrence of a spiking layer in one TIR loop.

A spiking layer exported with all T steps unrolled (the zoo's ``SpikingMLP``: one matmul over T*B rows
for the stateless part, then per step ``u = beta*u + I_t; s = (u - theta > 0); reset``) becomes, after
ONNX import, ~8 tiny elementwise ops per step on (B, N) tensors, strided slices of the current matrix
C (T*B, N) and a final concat of the T spike tensors. Generic lowering runs each as its own kernel
(~60 launches per layer at T=8, every intermediate through memory).

The ``fuse-lif`` pass (``kernels.tvm.passes.fuse_lif``) reads that per-neuron graph off the Relax IR (any
elementwise recurrence whose inputs are row slices of ONE tensor C and scalar constants; the LIF shape is
not hard-coded), and ``fused_recurrence_kernel`` evaluates it for a vector of neurons at a time, all T
steps in registers:

    for each chunk of L neurons (L = the profile's vector lanes):
        u, s for t = 0..T-1 computed from C[t, chunk] in registers; store S[t, chunk]

Where C is ``S @ W [+ b]`` with a constant W (the zoo's layers: every layer's input S is spikes or the
rate-coded image), ``fused_layer_kernel`` does the whole layer in one kernel instead, event-driven:

    compact the input columns k where some step has S[t, k] != 0 (index list + a transposed copy)
    for each block of BN output neurons, for each block of RB <= 16 steps (RB x BN accumulators in registers):
        for each active k:  acc[t, :] += S[t, k] * W[k, block]   (the weight row read once for RB steps)
        the recurrence over t on acc + b, in registers; store the spikes

Rows of W whose input never spikes are not read at all (skipping an exact zero term changes no sum),
so the cost follows the spike count, and in the dense worst case it is still one pass over W for all
T steps. The sum over k runs in the same order as the generic lowering's matmul, so results are
bit-identical to it. Otherwise (C not a constant-weight matmul) the stateless matmul stays one
GEMV-shaped kernel (M = T*B rows) before ``fused_recurrence_kernel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir._elementwise import CONST, ROW, Node, apply_op
from kernels.tvm.tir.bf16 import widened

KERNEL_NAME = "lif-fused-f32"
LAYER_KERNEL_NAME = "lif-layer-f32"
LAYER_KERNEL_NAME_BF16W = "lif-layer-bf16w"  # weights stored as bfloat16 (exact ones only), fp32 arithmetic
MAX_ACC_VECTORS = 16  # T x BN accumulators kept in vector registers (AVX-512 has 32)


@dataclass
class Recurrence:
    """Per-neuron graph: nodes in topological order; outputs are the concat's parts, in order."""

    nodes: list[Node] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    source: Any = None  # the Relax var C of shape (T*B, N)
    rows: int = 0  # T*B


def _emit_recurrence(g: Recurrence, row: Any, scratch: Any, out: Any, lane: Any, col: Any) -> None:
    """Store every output step of ``g`` for one lane: ``row(r)`` gives C[r] for this lane, every node
    goes through a register-resident scratch row (shared subexpressions computed once). ``exp`` stays
    ``llvm.exp``, as in the generic lowering, so the spikes match it bit for bit."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import FloatImm

    val: dict[int, Any] = {}
    for i, nd in enumerate(g.nodes):
        if nd.kind == CONST:
            val[i] = FloatImm("float32", nd.values[0])
            continue
        e = row(nd.start) if nd.kind == ROW else apply_op(nd.op, *(val[a] for a in nd.args), exact_exp=True)
        T.buffer_store(scratch, e, [i, lane])
        val[i] = scratch[i, lane]
    for t, o in enumerate(g.outputs):
        T.buffer_store(out, val[o], [t, col])


def row_block(rows: int) -> int:
    """Input rows (time steps) accumulated together: all of them up to 16, else the largest divisor up to
    16. Measured at T=16 (snn-mlp, 784-512): 16 rows x 16 neurons per pass beat 8 x 32 by 15 % and 4 x 64
    by 35 %; every extra row block re-walks the active-input list."""
    return max(d for d in range(1, min(rows, 16) + 1) if rows % d == 0)


def layer_block_n(rows: int, lanes: int) -> int:
    """Output neurons per block: as many vectors as keep RB x BN accumulators within the registers."""
    return lanes * max(1, min(4, MAX_ACC_VECTORS // row_block(rows)))


def pack_layer(w: np.ndarray, b: np.ndarray | None, block_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) weight -> (NB, K, BN) blocks (zero padded); bias -> (NB * BN,) (zeros without bias)."""
    k, n = w.shape
    nb = -(-n // block_n)
    wp = np.zeros((k, nb * block_n), np.float32)
    wp[:, :n] = w
    bp = np.zeros(nb * block_n, np.float32)
    if b is not None:
        bp[:n] = b.reshape(n)
    return np.ascontiguousarray(wp.reshape(k, nb, block_n).transpose(1, 0, 2)), bp


def fused_layer_kernel(g: Recurrence, k: int, n: int, block_n: int, has_bias: bool,
                       s_shape: tuple[int, ...], w_dtype: str = "float32") -> Any:
    """PrimFunc ``(s[R, K], wp[NB, K, BN], b[NB*BN], out[T, N])``: the event-driven matmul over all R = T*B
    input rows and the recurrence, one block of BN neurons at a time; ``wp`` stored in ``w_dtype``
    (float32, or bfloat16 widened to fp32 on load)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast, FloatImm, Select

    f32, rows, t_out, bn = "float32", g.rows, len(g.outputs), block_n
    nb_total, tail = -(-n // bn), n % bn
    zero = FloatImm(f32, 0.0)
    with IRBuilder() as ib, T.prim_func():
        T.func_name("lif_layer")
        kernel = LAYER_KERNEL_NAME if w_dtype == f32 else LAYER_KERNEL_NAME_BF16W
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: kernel, "tirx.is_scheduled": True, "op_pattern": 8})
        sg = T.arg("s", T.buffer(s_shape, f32))
        wp = T.arg("wp", T.buffer((nb_total, k, bn), w_dtype))
        bp = T.arg("b", T.buffer((nb_total * bn,), f32))
        out = T.arg("out", T.buffer((t_out, n), f32))
        s = T.decl_buffer((rows, k), f32, data=sg.data)
        idx = T.alloc_buffer((k,), "int32")
        sc = T.alloc_buffer((k, rows), f32)  # active columns of s, transposed: one row per active input
        cnt = T.alloc_buffer((1,), "int32", scope="local")
        acc = T.alloc_buffer((rows, bn), f32, scope="local")
        scratch = T.alloc_buffer((len(g.nodes), bn), f32, scope="local")
        T.buffer_store(cnt, 0, [0])
        with T.serial(0, k) as kk:
            active = s[0, kk] != zero
            for r in range(1, rows):
                active = active | (s[r, kk] != zero)
            # Branch-free compaction: always write at the cursor, advance it only for an active column.
            with T.serial(0, rows) as r:
                T.buffer_store(sc, s[r, kk], [cnt[0], r])
            T.buffer_store(idx, kk, [cnt[0]])
            T.buffer_store(cnt, cnt[0] + Cast("int32", Select(active, 1, 0)), [0])
        with T.serial(0, nb_total) as nb:
            for r in range(rows):
                with T.vectorized(0, bn) as i:
                    T.buffer_store(acc, zero, [r, i])
            # RB rows at a time keep RB x BN accumulators in registers (T <= 16: one pass, every weight
            # row read once); a further row block re-reads this block's active weight rows from cache.
            rb = row_block(rows)
            for r0 in range(0, rows, rb):
                with T.serial(0, cnt[0]) as j:
                    for r in range(r0, r0 + rb):
                        with T.vectorized(0, bn) as i:
                            T.buffer_store(acc, acc[r, i] + sc[j, r] * widened(wp[nb, idx[j], i], w_dtype), [r, i])

            def recurrence(width: int, nb: Any = nb) -> None:
                with T.vectorized(0, width) as i:
                    _emit_recurrence(g, lambda r: acc[r, i] + bp[nb * bn + i] if has_bias else acc[r, i],
                                     scratch, out, i, nb * bn + i)

            if tail:  # the last block writes only its first N % BN neurons
                with T.If(nb < nb_total - 1):
                    with T.Then():
                        recurrence(bn)
                    with T.Else():
                        recurrence(tail)
            else:
                recurrence(bn)
    return ib.get()


def fused_recurrence_kernel(g: Recurrence, n: int, lanes: int) -> Any:
    """PrimFunc ``(c[T, N], s[T, N])``: every output step of the recurrence for all neurons."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    f32 = "float32"

    def body(c: Any, s: Any, scratch: Any, j0: Any, lane: Any, width: int) -> None:
        _emit_recurrence(g, lambda r: c[r, j0 + lane], scratch, s, lane, j0 + lane)

    chunks, rem = n // lanes, n % lanes
    with IRBuilder() as ib, T.prim_func():
        T.func_name("lif_fused")
        # op_pattern 8 (opaque): Relax's pattern analysis would otherwise inspect this block-free
        # elementwise kernel as a potential reshape (and fail); opaque also keeps it out of fusion.
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME, "tirx.is_scheduled": True,
                     "op_pattern": 8})
        c = T.arg("c", T.buffer((g.rows, n), f32))
        s = T.arg("s", T.buffer((len(g.outputs), n), f32))
        scratch = T.alloc_buffer((len(g.nodes), lanes), f32, scope="local")
        if chunks:
            with T.serial(0, chunks) as ci, T.vectorized(0, lanes) as lane:
                body(c, s, scratch, ci * lanes, lane, lanes)
        if rem:
            with T.vectorized(0, rem) as lane:
                body(c, s, scratch, chunks * lanes, lane, rem)
    return ib.get()


__all__ = ["KERNEL_NAME", "LAYER_KERNEL_NAME", "LAYER_KERNEL_NAME_BF16W", "Recurrence", "fused_layer_kernel",
           "fused_recurrence_kernel", "layer_block_n", "pack_layer", "row_block"]
