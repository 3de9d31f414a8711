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

Where C is the int8 pass's dynamic-int8 layer of S (DynamicQuantizeLinear, MatMulInteger by an int8 W, the
scales [+ bias]), ``fused_layer_int8_kernel`` does it on the CPU's int8 dot products (``int8_dot.dot4``: 4
inputs x one int32 lane per instruction). Spikes are 0 / 1, so their quantized bytes take two values, picked
without a division per element; a group of 4 inputs whose bytes are zero at every step is skipped; RB steps x
BN neurons of int32 accumulators per pass over the active groups, the weight vector read once per RB steps;
then the dequantization (the graph's float operations) and the recurrence in registers. The first layer's S,
when it is elementwise in one (1, K) tensor (the rate code of the image), is computed in the kernel too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir._elementwise import CONST, ROW, Node, apply_op
from kernels.tvm.tir.bf16 import widened
from kernels.tvm.tir.gemv import SCRATCH_SCOPE
from kernels.tvm.tir.int8_dot import ISAS, dot4, packed_size

KERNEL_NAME = "lif-fused-f32"
LAYER_KERNEL_NAME = "lif-layer-f32"
LAYER_KERNEL_NAME_BF16W = "lif-layer-bf16w"  # weights stored as bfloat16 (exact ones only), fp32 arithmetic
LAYER_KERNEL_NAME_INT8 = "lif-layer-i8"  # dynamic-int8 layer: int8 weights on the CPU's int8 dot products
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
        cnt = T.alloc_buffer((1,), "int32", scope=SCRATCH_SCOPE)
        acc = T.alloc_buffer((rows, bn), f32, scope=SCRATCH_SCOPE)
        scratch = T.alloc_buffer((len(g.nodes), bn), f32, scope=SCRATCH_SCOPE)
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


def int8_layer_tiles(rows: int, lanes: int) -> tuple[int, int]:
    """(RB, BN) of the int8 layer kernel: RB input rows (time steps) accumulated per pass over the active
    groups, BN output neurons per block, RB x BN / lanes int32 accumulators within MAX_ACC_VECTORS. Per group
    and pass a block costs RB broadcast loads + BN / lanes weight loads for RB x BN / lanes dot products;
    measured at T=16, 784-512 on AVX-512 VNNI (two load ports, two vpdpbusd per cycle): 8 x 32 beat 16 x 16."""
    rb = max(d for d in range(1, min(rows, 8) + 1) if rows % d == 0)
    return rb, lanes * max(1, min(4, MAX_ACC_VECTORS // rb))


def padded_columns(n: int, block_n: int, lanes: int) -> int:
    """Columns of the int8 layer kernel's per-column constants: whole blocks, the tail to whole vectors."""
    return n // block_n * block_n + -(-(n % block_n) // lanes) * lanes


def _emit_spike_quantization(isa: Any, s: Any, rows: int, k: int) -> tuple[Any, Any, Any, Any, Any]:
    """DynamicQuantizeLinear of the float (rows, K) buffer ``s`` as TVM imports it (the formulas of
    ``int8_dot.emit_dynamic_quantization``: per-tensor min / max, scale, zero point, ``q = clip(round(s /
    scale) + zp, 0, 255)``), for spike tensors: where every element is 0 or 1 the two quantized values are
    computed once and selected (q is a function of the element: the same bytes, without a division per
    element). Returns (scale, int32 zero point + the ISA's shift, the (rows, K4) int32 words of the bytes as
    the ISA multiplies them, the (K4,) int32 words of the per-input "some step nonzero" bytes, K4)."""
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast, Select

    f32, L, U = "float32", 16, 4  # U partial extrema of L lanes: independent max / min chains
    k4 = -(-k // 4)
    total = rows * k
    main = total // (L * U) * (L * U)
    flat = T.decl_buffer((total,), f32, data=s.data)
    ext = T.alloc_buffer((3, U, L), f32, scope=SCRATCH_SCOPE)  # max, min, "an element is neither 0 nor 1"
    with T.unroll(U) as u, T.vectorized(L) as i:
        T.buffer_store(ext, T.min_value(f32), [0, u, i])
        T.buffer_store(ext, T.max_value(f32), [1, u, i])
        T.buffer_store(ext, T.float32(0), [2, u, i])

    def visit(u: Any, i: Any, v: Any) -> None:
        T.buffer_store(ext, T.max(ext[0, u, i], v), [0, u, i])
        T.buffer_store(ext, T.min(ext[1, u, i], v), [1, u, i])
        other = Select((v == T.float32(0)) | (v == T.float32(1)), T.float32(0), T.float32(1))
        T.buffer_store(ext, T.max(ext[2, u, i], other), [2, u, i])

    with T.serial(main // (L * U)) as o, T.unroll(U) as u, T.vectorized(L) as i:
        visit(u, i, flat[(o * U + u) * L + i])
    with T.serial(total - main) as r:
        visit(0, 0, flat[main + r])
    with T.serial(U - 1) as u, T.vectorized(L) as i:
        for e in range(3):
            fold = T.min if e == 1 else T.max
            T.buffer_store(ext, fold(ext[e, 0, i], ext[e, u + 1, i]), [e, 0, i])
    with T.serial(L - 1) as i:
        for e in range(3):
            fold = T.min if e == 1 else T.max
            T.buffer_store(ext, fold(ext[e, 0, 0], ext[e, 0, i + 1]), [e, 0, 0])
    hi = T.bind(T.max(T.float32(0), ext[0, 0, 0]))
    lo = T.bind(T.min(T.float32(0), ext[1, 0, 0]))
    scale = T.bind((hi - lo) / T.float32(255))
    zpf = T.bind(T.nearbyint(T.max(T.min(T.float32(0) - lo / scale, T.float32(255)), T.float32(0))))
    zp = T.bind(Cast("uint8", zpf))

    def quantize(v: Any) -> Any:
        return Cast("uint8", T.max(T.min(T.round(v / scale) + Cast(f32, zp), T.float32(255)), T.float32(0)))

    q0, q1 = T.bind(quantize(T.float32(0))), T.bind(quantize(T.float32(1)))
    xq = T.alloc_buffer((rows, k4 * 4), isa.x_dtype, scope=SCRATCH_SCOPE)
    seen = T.alloc_buffer((k4 * 4,), "uint8", scope=SCRATCH_SCOPE)  # per input: max over the steps of its byte
    with T.serial(k4) as o, T.vectorized(4) as i:
        T.buffer_store(seen, T.uint8(0), [o * 4 + i])

    def store(m: Any, i: Any, u: Any) -> None:
        v = u if not isa.x_shift else Cast("int8", Cast("int16", u) + T.int16(isa.x_shift))
        T.buffer_store(xq, v, [m, i])
        T.buffer_store(seen, T.max(seen[i], u), [i])

    def each_element(body: Any) -> None:
        """``body(m, i)`` for every element, in vectors of L floats (a whole row as one vector of bytes
        would be legalized byte by byte)."""
        with T.serial(rows) as m:
            with T.serial(k // L) as o, T.vectorized(L) as i:
                body(m, o * L + i)
            if k % L:
                with T.vectorized(k % L) as i:
                    body(m, k // L * L + i)

    with T.If(ext[2, 0, 0] == T.float32(0)):
        with T.Then():
            each_element(lambda m, i: store(m, i, Select(s[m, i] == T.float32(1), q1, q0)))
        with T.Else():
            each_element(lambda m, i: store(m, i, quantize(s[m, i])))
    with T.serial(rows) as m, T.serial(k4 * 4 - k) as i:
        T.buffer_store(xq, T.Cast(isa.x_dtype, 0), [m, k + i])
    words = T.decl_buffer((rows, k4), "int32", data=xq.data, scope=SCRATCH_SCOPE)
    seen_words = T.decl_buffer((k4,), "int32", data=seen.data, scope=SCRATCH_SCOPE)
    zeff = T.bind(Cast("int32", zp) + T.int32(isa.x_shift))
    return scale, zeff, words, seen_words, k4


def fused_layer_int8_kernel(g: Recurrence, k: int, n: int, block_n: int, isa_name: str, has_bias: bool,
                            s_shape: tuple[int, ...], row_block: int = 0, input_code: Recurrence | None = None) -> Any:
    """PrimFunc ``(s[R, K] float32, wp[packed] int8, colsum[NP] int32, wscale[NP] float32, b[NP or 1] float32,
    out[T, N] float32)``: the dynamic-int8 layer (ONNX Runtime's DynamicQuantizeLinear of s, MatMulInteger by
    the ``int8_dot.pack_int8``-packed weight, ``* (sx * wscale) [+ b]``) and the recurrence on its output, in
    one kernel on ``isa_name``'s int8 dot products (``int8_dot.dot4``); per-column constants padded to
    ``padded_columns`` NP. Event-driven like ``fused_layer_kernel``, per group of 4 inputs: groups whose
    quantized bytes are zero at every step are skipped (an exact zero term), so spikes cost only where some
    step fires. Products are exact integers and the dequantization the graph's own float operations:
    bit-identical to the generic lowering of the same graph. ``row_block``: RB (0: ``int8_layer_tiles``).
    ``input_code``: s is not the argument but computed from it, row t = ``input_code``'s output t of the (1, K)
    argument (the elementwise rate code of an image; ``fuse_lif.extract_recurrence(whole_input=True)``)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import Cast

    f32, rows, t_out = "float32", g.rows, len(g.outputs)
    isa = ISAS[isa_name]
    V, BN = isa.lanes, block_n
    rb = row_block or int8_layer_tiles(rows, V)[0]
    full, tail = n // BN, n % BN
    tbn = -(-tail // V) * V
    np_cols = padded_columns(n, BN, V)
    with IRBuilder() as ib, T.prim_func():
        T.func_name("lif_layer_i8")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: LAYER_KERNEL_NAME_INT8, "tirx.is_scheduled": True,
                     "op_pattern": 8})
        sg = T.arg("s", T.buffer(s_shape, f32))
        wp = T.arg("wp", T.buffer((max(1, packed_size(k, n, BN, V)),), "int8"))
        cs = T.arg("colsum", T.buffer((np_cols,), "int32"))
        ws = T.arg("wscale", T.buffer((np_cols,), f32))
        bb = T.arg("b", T.buffer((np_cols if has_bias else 1,), f32))
        out = T.arg("out", T.buffer((t_out, n), f32))
        if input_code is None:
            s = T.decl_buffer((rows, k), f32, data=sg.data)
        else:  # every step's input from the one argument row, all steps per vector of inputs
            x = T.decl_buffer((1, k), f32, data=sg.data)
            s = T.alloc_buffer((rows, k), f32, scope=SCRATCH_SCOPE)
            code_scratch = T.alloc_buffer((len(input_code.nodes), 16), f32, scope=SCRATCH_SCOPE)

            def code(base: int | Any, width: int) -> None:
                with T.vectorized(0, width) as i:
                    _emit_recurrence(input_code, lambda _r, i=i: x[0, base + i], code_scratch, s, i, base + i)

            with T.serial(0, k // 16) as o:
                code(o * 16, 16)
            if k % 16:
                code(k // 16 * 16, k % 16)
        sx, zeff, words, seen, K4 = _emit_spike_quantization(isa, s, rows, k)
        # The active groups: some step's byte is nonzero in one of their 4 inputs. Branch-free: always write
        # at the cursor, advance it only for an active group.
        idx = T.alloc_buffer((K4,), "int32", scope=SCRATCH_SCOPE)
        cnt = T.alloc_buffer((1,), "int32", scope=SCRATCH_SCOPE)
        T.buffer_store(cnt, 0, [0])
        with T.serial(0, K4) as kk:
            T.buffer_store(idx, kk, [cnt[0]])
            T.buffer_store(cnt, cnt[0] + Cast("int32", seen[kk] != T.int32(0)), [0])
        # Per-block scratch, allocated once (an allocation inside the block loop is one per block).
        wmax = BN if full else tbn
        acc = T.alloc_buffer((rows, wmax), "int32", scope=SCRATCH_SCOPE)
        # With shifted activations (sdot) a skipped group still has a nonzero shifted term: the sum over the
        # active groups of the weight (a dot with ones) puts it back.
        act_sum = T.alloc_buffer((wmax,), "int32", scope=SCRATCH_SCOPE) if isa.x_shift else None
        scratch = T.alloc_buffer((len(g.nodes), wmax), f32, scope=SCRATCH_SCOPE)
        tail_out = T.alloc_buffer((t_out, tbn), f32, scope=SCRATCH_SCOPE) if tail else None

        def block(col0: Any, woff: Any, width: int, nout: int) -> None:
            """Output neurons col0 .. col0 + nout (``width`` packed columns, whole vectors) at weight offset woff."""
            for r in range(rows):
                with T.unroll(width // V) as c:
                    T.buffer_store(acc, T.Broadcast(T.int32(0), V), [r, T.Ramp(c * V, 1, V)])
            if act_sum is not None:
                with T.unroll(width // V) as c:
                    T.buffer_store(act_sum, T.Broadcast(T.int32(0), V), [T.Ramp(c * V, 1, V)])
            for r0 in range(0, rows, rb):  # RB x width accumulators in registers; the weight vector read once per RB
                with T.serial(0, cnt[0]) as j:
                    grp = T.bind(idx[j])
                    with T.unroll(width // V) as c:
                        w = T.bind(wp[T.Ramp(woff + grp * (width * 4) + c * (V * 4), 1, 4 * V)])
                        lanes = T.Ramp(c * V, 1, V)
                        for r in range(r0, min(rows, r0 + rb)):
                            T.buffer_store(acc, dot4(isa, acc[r, lanes], words[r, grp], w), [r, lanes])
                        if act_sum is not None and r0 == 0:
                            T.buffer_store(act_sum, dot4(isa, act_sum[lanes], T.int32(0x01010101), w), [lanes])
            # The recurrence at the block's whole vector width (padded constants); a narrower tail goes through
            # a copy so the stores to ``out`` stay within its rows.
            dst = out if nout == width else tail_out
            with T.vectorized(0, width) as i:
                col = col0 + i
                # sum (q - zp) w = acc - zeff colsum; with the shift and skipped groups:
                # acc - zp colsum - shift active_sum = acc - (zeff - shift) colsum - shift active_sum.
                if act_sum is None:
                    fix = zeff * cs[col]
                else:
                    fix = (zeff - T.int32(isa.x_shift)) * cs[col] + T.int32(isa.x_shift) * act_sum[i]

                def current(r: int, i: Any = i, col: Any = col, fix: Any = fix) -> Any:
                    f = Cast(f32, acc[r, i] - fix) * (sx * ws[col])
                    return f + bb[col] if has_bias else f

                _emit_recurrence(g, current, scratch, dst, i, col if nout == width else i)
            if nout != width:
                with T.serial(0, t_out) as t, T.vectorized(0, nout) as i:
                    T.buffer_store(out, dst[t, i], [t, col0 + i])

        if full:
            with T.serial(0, full) as nb:
                block(nb * BN, nb * (K4 * BN * 4), BN, BN)
        if tail:
            block(full * BN, full * (K4 * BN * 4), tbn, tail)
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
        scratch = T.alloc_buffer((len(g.nodes), lanes), f32, scope=SCRATCH_SCOPE)
        if chunks:
            with T.serial(0, chunks) as ci, T.vectorized(0, lanes) as lane:
                body(c, s, scratch, ci * lanes, lane, lanes)
        if rem:
            with T.vectorized(0, rem) as lane:
                body(c, s, scratch, chunks * lanes, lane, rem)
    return ib.get()


__all__ = ["KERNEL_NAME", "LAYER_KERNEL_NAME", "LAYER_KERNEL_NAME_BF16W", "LAYER_KERNEL_NAME_INT8", "Recurrence",
           "fused_layer_int8_kernel", "fused_layer_kernel", "fused_recurrence_kernel", "int8_layer_tiles",
           "layer_block_n", "pack_layer", "padded_columns", "row_block"]
