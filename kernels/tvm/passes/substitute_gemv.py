"""substitute-gemv: batch-1 dense layers as the packed GEMV kernel (or the grouped one where the weight is
block-sparse), by pattern, on the Relax graph right after ONNX import.

``matmul(x, W) [+ b] [relu]`` with ``W`` a 2-D constant (or ONNX Gemm's ``permute_dims`` of one) and ``x``
of shape (..., K) with at most MAX_GEMV_ROWS rows becomes one ``call_tir`` of ``kernels.tvm.tir.gemv``
(``kernels.tvm.tir.block_sparse`` for a sparse W), the weight re-laid out at compile time into a new
constant; ``matmul(x: int32, W: int8 constant, out_dtype=int32)`` (ONNX MatMulInteger) takes the int8
variant: on a CPU with int8 dot products (``KernelConfig.int8_isa``) and an activation that is
``astype(xq: uint8) - astype(zp: uint8)`` (what DynamicQuantizeLinear / QuantizeLinear import as), the kernel
takes ``xq`` and ``zp`` themselves and multiplies on VNNI / AVX2 / sdot (``kernels.tvm.tir.int8_dot``),
otherwise it sign-extends to int32. A whole dynamic-int8 layer (DynamicQuantizeLinear's min / max / scale /
zero point / quantize, MatMulInteger, ``* (sx * wscale)`` [+ bias] [relu]: about ten kernels as imported)
becomes one kernel (``match_dynamic_layer``), and so does a whole static-int8 layer (the int8 pass's integer
form: the activation's QuantizeLinear with constant parameters, MatMulInteger, ``* scale`` [+ bias], then any
relu / QuantizeLinear -> DequantizeLinear steps: ``match_static_layer``); a block-sparse int8 weight takes the
grouped int8 kernel. Such whole layers (float in, float out) are what ``fuse-gemv-chains`` chains. Only the end
of each chain is rewritten; the absorbed bindings are dead code afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm.passes._rewrite import RewritePass, bindings_and_uses, const_array, rewrite_bindings, static_shape
from kernels.tvm.tir.block_sparse import KERNEL_NAME as GROUPED_NAME
from kernels.tvm.tir.block_sparse import KERNEL_NAME_INT8 as GROUPED_I8_NAME
from kernels.tvm.tir.block_sparse import (
    BlockSparseInt8,
    grouped_dot_kernel,
    grouped_gemv_kernel,
    pack_block_sparse,
    pack_block_sparse_int8,
    regroup_columns,
)
from kernels.tvm.tir.gemv import KERNEL_NAME as GEMV_NAME
from kernels.tvm.tir.gemv import KERNEL_NAME_INT8 as GEMV_I8_NAME
from kernels.tvm.tir.gemv import GemvParams, choose_block_n, gemv_kernel, pack_weight
from kernels.tvm.tir.int8_dot import ISAS, DotParams, PostOp, column_sums, dot_kernel, exact_on, pack_int8

# Rows above this go to the generic (tunable) matmul: the GEMV kernel re-reads each weight block once
# per block of rows, which stops paying against a tiled GEMM somewhere past the T*B of a spiking layer.
MAX_GEMV_ROWS = 64
# A sparse weight goes to the grouped kernel when its blocks keep at most this share of the rows:
# above it, index loads and short row runs cost more than the skipped zeros save.
MAX_GROUPED_DENSITY = 0.6

# A matched layer: (x, W, bias or None, relu, zero point). The zero point (a Relax expression) is set for an
# int8 layer on dot products: x is then the uint8 activation and the kernel subtracts the zero point itself.
Dense = tuple[Any, np.ndarray, "np.ndarray | None", bool, Any]


@dataclass(frozen=True)
class DynamicLayer:
    """A whole dynamic-int8 layer: ``act(float(MatMulInteger(DynamicQuantizeLinear(x), W)) * (sx * wscale)
    [+ bias])`` with x float; one kernel quantizes, multiplies and dequantizes (``DotParams.dynamic``)."""

    x: Any
    w: np.ndarray  # int8 (K, N)
    wscale: np.ndarray  # float32 (N,)
    bias: np.ndarray | None
    relu: bool


@dataclass(frozen=True)
class StaticLayer:
    """A whole static-int8 layer (the int8 pass's integer form): ``post(float(MatMulInteger(quantize(x, sx,
    zx), W)) * scale [+ bias])`` with x float and ``post`` the relu / quantize-dequantize steps after it; one
    kernel quantizes, multiplies, dequantizes and requantizes (``DotParams.x_scale``)."""

    x: Any
    w: np.ndarray  # int8 (K, N)
    scale: np.ndarray  # float32 (N,): sx * the weight's scale
    bias: np.ndarray | None
    x_scale: float
    x_zero: int
    post: tuple[PostOp, ...]


def _is_int8_matmul(call: Any, x: Any, w: np.ndarray) -> bool:
    """matmul(x: int32, W: integer constant within int8, out_dtype=int32): ONNX MatMulInteger."""
    out = str(getattr(call.attrs, "out_dtype", "")) if call.attrs is not None else ""
    return (out == "int32" and str(getattr(x.ty, "dtype", "")) == "int32" and np.issubdtype(w.dtype, np.integer)
            and w.size > 0 and int(w.min()) >= -128 and int(w.max()) <= 127)


def quantized_input(x: Any, inner: Any) -> tuple[Any, Any] | None:
    """(xq, zp) when the int32 activation ``x`` is ``astype(xq: uint8, int32) - astype(zp: uint8 scalar, int32)``."""
    import tvm
    from tvm import relax

    op_sub = tvm.ir.Op.get("relax.subtract")
    op_cast = tvm.ir.Op.get("relax.astype")

    def uint8_of(e: Any) -> Any:
        v = e if const_array(e) is not None else inner(e)
        arr = const_array(v) if v is not None else None
        if arr is not None:  # a folded constant zero point
            ok = arr.size == 1 and np.issubdtype(arr.dtype, np.integer) and 0 <= int(arr.min()) <= int(arr.max()) <= 255
            return relax.const(arr.reshape(()).astype(np.uint8)) if ok else None
        if isinstance(v, relax.Call) and v.op == op_cast and str(getattr(v.args[0].ty, "dtype", "")) == "uint8":
            return v.args[0]
        return None

    sub = inner(x)
    if not isinstance(sub, relax.Call) or sub.op != op_sub:
        return None
    xq, zp = uint8_of(sub.args[0]), uint8_of(sub.args[1])
    if xq is None or zp is None or static_shape(xq) != static_shape(x) or static_shape(zp) not in ((), (1,)):
        return None
    if static_shape(zp) == (1,):
        zp = relax.op.reshape(zp, ())
    return xq, zp


def _is_dynamic_scale(s: Any, x: Any, bound: dict[Any, Any]) -> bool:
    """``s`` is DynamicQuantizeLinear's scale of ``x`` as TVM imports it:
    ``(maximum(0, max(x)) - minimum(0, min(x))) / 255``."""
    from tvm import relax

    def call(e: Any, name: str) -> Any:
        v = bound.get(e) if isinstance(e, relax.Var) else None
        return v if isinstance(v, relax.Call) and getattr(v.op, "name", "") == name else None

    div = call(s, "relax.divide")
    sub = call(div.args[0], "relax.subtract") if div is not None else None
    if sub is None or not np.allclose(const_array(div.args[1]) if const_array(div.args[1]) is not None else 0, 255):
        return False
    hi, lo = call(sub.args[0], "relax.maximum"), call(sub.args[1], "relax.minimum")
    if hi is None or lo is None:
        return False
    mx, mn = call(hi.args[1], "relax.max"), call(lo.args[1], "relax.min")
    return mx is not None and mn is not None and mx.args[0].same_as(x) and mn.args[0].same_as(x) and \
        getattr(mx.attrs, "axis", None) is None and getattr(mn.attrs, "axis", None) is None


def _is_dynamic_zero_point(z: Any, s: Any, bound: dict[Any, Any]) -> bool:
    """``z`` is ``astype(round(clip(0 - minimum(0, min(x)) / s, 0, 255)), uint8)`` (its scale ``s``)."""
    from tvm import relax

    def call(e: Any, name: str) -> Any:
        v = bound.get(e) if isinstance(e, relax.Var) else None
        return v if isinstance(v, relax.Call) and getattr(v.op, "name", "") == name else None

    cast = call(z, "relax.astype")
    rnd = call(cast.args[0], "relax.round") if cast is not None else None
    clip = call(rnd.args[0], "relax.clip") if rnd is not None else None
    neg = call(clip.args[0], "relax.subtract") if clip is not None else None
    div = call(neg.args[1], "relax.divide") if neg is not None else None
    return div is not None and div.args[1].same_as(s) and str(cast.attrs.dtype) == "uint8"


def _split_const(call: Any) -> tuple[Any, np.ndarray | None]:
    """(the other operand, the constant's value) of a binary call with a constant operand (None: neither is)."""
    a, c = call.args
    if const_array(c) is None:
        a, c = c, a
    return a, const_array(c)


class _Walk:
    """Walks a layer's bindings back from its end: ``inner`` looks through a binding used once (only then may
    the layer's kernel absorb it), recording it in ``taken``; ``is_call`` tests for a call of ``relax.<op>``."""

    def __init__(self, bound: dict[Any, Any], uses: dict[Any, int]) -> None:
        self.bound, self.uses = bound, uses
        self.taken: list[Any] = []

    def inner(self, e: Any) -> Any:
        from tvm import relax

        if isinstance(e, relax.Var) and self.uses.get(e, 0) == 1 and e in self.bound:
            self.taken.append(e)
            return self.bound[e]
        return None

    def through_bias(self, node: Any) -> tuple[Any, np.ndarray | None]:
        """(what ``node`` adds its constant bias to, the bias) when it is such an add, else (node, None); an add
        of no constant gives (None, None)."""
        if not self.is_call(node, "add"):
            return node, None
        a, bias = _split_const(node)
        return (self.inner(a), bias) if bias is not None else (None, None)

    @staticmethod
    def is_call(e: Any, op: str) -> bool:
        from tvm import relax

        return isinstance(e, relax.Call) and getattr(e.op, "name", "") == f"relax.{op}"


def match_dynamic_layer(call: Any, bound: dict[Any, Any], uses: dict[Any, int], absorbed: list[Any],
                        int8_isa: str) -> DynamicLayer | None:
    """The whole dynamic-int8 layer ending at ``call`` (``[relu](astype(MatMulInteger) * (sx * wscale)
    [+ bias])`` over ``quantize(x, sx, zx)`` with sx / zx computed from x), on a CPU with int8 dot products
    that multiply W exactly; None otherwise. Absorbed bindings are appended to ``absorbed``."""

    if int8_isa not in ISAS:
        return None
    walk = _Walk(bound, uses)
    inner, is_call, taken = walk.inner, walk.is_call, walk.taken

    node, relu = call, False
    if is_call(node, "nn.relu"):
        relu, node = True, inner(node.args[0])
    node, bias = walk.through_bias(node)
    if not is_call(node, "multiply"):
        return None
    p, q = (inner(a) for a in node.args)
    if not is_call(p, "astype"):
        p, q = q, p
    if not is_call(p, "astype") or not is_call(q, "multiply") or str(p.attrs.dtype) != "float32":
        return None
    mm = inner(p.args[0])
    s, wsc = q.args
    if const_array(s) is not None:
        s, wsc = wsc, s
    wscale = const_array(wsc)
    if not is_call(mm, "matmul") or wscale is None:
        return None
    wa = const_array(mm.args[1])
    if wa is None or wa.ndim != 2 or not _is_int8_matmul(mm, mm.args[0], wa):
        return None
    w8 = wa.astype(np.int8)
    if not exact_on(int8_isa, w8):
        return None
    qin = quantized_input(mm.args[0], inner)
    # A quantized activation several layers read (parallel branches) is quantized again in each kernel.
    quant = None if qin is None else inner(qin[0]) if uses.get(qin[0], 0) == 1 else bound.get(qin[0])
    if not is_call(quant, "quantize") or not quant.args[1].same_as(s) or not quant.args[2].same_as(qin[1]):
        return None
    x = quant.args[0]
    xs, n = static_shape(x), wa.shape[1]
    if xs is None or len(xs) < 2 or xs[-1] != wa.shape[0] or int(np.prod(xs[:-1])) > MAX_GEMV_ROWS:
        return None
    if str(getattr(x.ty, "dtype", "")) != "float32" or not _is_dynamic_scale(s, x, bound) or \
            not _is_dynamic_zero_point(qin[1], s, bound):
        return None
    if wscale.size not in (1, n) or (bias is not None and (bias.size != n or bias.dtype != np.float32)):
        return None
    absorbed += taken
    return DynamicLayer(x, w8, np.broadcast_to(wscale.astype(np.float32).reshape(-1), (n,)).copy(),
                        None if bias is None else bias.reshape(n), relu)


def _scalar(e: Any) -> float | None:
    """The value of a one-element Relax constant, None for anything else."""
    a = const_array(e)
    return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None


def match_static_layer(call: Any, bound: dict[Any, Any], uses: dict[Any, int], absorbed: list[Any],
                       int8_isa: str) -> StaticLayer | None:
    """The whole static-int8 layer ending at ``call``: ``post(astype(MatMulInteger(xq - zx, W)) * scale
    [+ bias])`` with ``xq = quantize(x, sx, zx)`` (constant, per tensor; xq may have other users: the kernel
    quantizes x again) and ``post`` any steps of relu and quantize -> dequantize (constant, per tensor, uint8),
    on a CPU with int8 dot products that multiply W exactly; None otherwise. Absorbed bindings are appended
    to ``absorbed``."""
    from tvm import relax

    if int8_isa not in ISAS:
        return None
    walk = _Walk(bound, uses)
    inner, is_call, taken = walk.inner, walk.is_call, walk.taken

    def qparams(e: Any) -> tuple[float, int] | None:
        """(scale, zero point) of a per-tensor uint8 quantize / dequantize with constant parameters."""
        s, z = _scalar(e.args[1]), _scalar(e.args[2])
        if s is None or z is None or not s > 0 or not 0 <= z <= 255 or z != int(z):
            return None
        return s, int(z)

    node: Any = call
    post: list[PostOp] = []
    while True:
        if is_call(node, "nn.relu"):
            post.insert(0, ("relu", 0.0, 0))
            node = inner(node.args[0])
            continue
        if is_call(node, "dequantize") and (qp := qparams(node)) is not None:
            q = inner(node.args[0])
            if not is_call(q, "quantize") or str(q.attrs.out_dtype) != "uint8" or qparams(q) != qp:
                return None
            post.insert(0, ("qdq", *qp))
            node = inner(q.args[0])
            continue
        break
    node, bias = walk.through_bias(node)
    if not is_call(node, "multiply"):
        return None
    a, scale = _split_const(node)
    cast = inner(a)
    if scale is None or not is_call(cast, "astype") or str(cast.attrs.dtype) != "float32":
        return None
    mm = inner(cast.args[0])
    if not is_call(mm, "matmul"):
        return None
    wa = const_array(mm.args[1])
    if wa is None or wa.ndim != 2 or not _is_int8_matmul(mm, mm.args[0], wa):
        return None
    w8 = wa.astype(np.int8)
    qin = quantized_input(mm.args[0], inner) if exact_on(int8_isa, w8) else None
    quant = bound.get(qin[0]) if qin is not None and isinstance(qin[0], relax.Var) else None
    if qin is None or not is_call(quant, "quantize") or str(quant.attrs.out_dtype) != "uint8":
        return None
    xqp, zp = qparams(quant), _scalar(qin[1])
    x, n = quant.args[0], wa.shape[1]
    xs = static_shape(x)
    if xqp is None or zp != xqp[1] or str(getattr(x.ty, "dtype", "")) != "float32":
        return None
    if xs is None or len(xs) < 2 or xs[-1] != wa.shape[0] or int(np.prod(xs[:-1])) > MAX_GEMV_ROWS:
        return None
    if scale.size not in (1, n) or scale.dtype != np.float32 or \
            (bias is not None and (bias.size != n or bias.dtype != np.float32)):
        return None
    absorbed += taken
    if uses.get(qin[0], 0) == 1:
        absorbed.append(qin[0])
    return StaticLayer(x, w8, np.broadcast_to(scale.reshape(-1), (n,)).copy(),
                       None if bias is None else bias.reshape(n), xqp[0], xqp[1], tuple(post))


def match_dense(call: Any, bound: dict[Any, Any], uses: dict[Any, int], absorbed: list[Any],
                int8_isa: str = "none") -> Dense | None:
    """(x, W, b, relu, zero point) when ``call`` ends a dense layer with a constant weight; the inner
    bindings it swallows are appended to ``absorbed``. With ``int8_isa`` (a ``kernels.tvm.int8_isa``
    family) an int8 layer whose weight that family multiplies exactly takes its uint8 activation."""
    import tvm
    from tvm import relax

    op_matmul = tvm.ir.Op.get("relax.matmul")
    op_add = tvm.ir.Op.get("relax.add")
    op_relu = tvm.ir.Op.get("relax.nn.relu")
    op_permute = tvm.ir.Op.get("relax.permute_dims")

    def inner(e: Any) -> Any:
        # Only look through a binding used once: otherwise its value is still needed elsewhere.
        if isinstance(e, relax.Var) and uses.get(e, 0) == 1 and e in bound:
            absorbed.append(e)
            return bound[e]
        return None

    relu = False
    node = call
    if not isinstance(node, relax.Call):
        return None
    if node.op == op_relu:
        relu = True
        node = inner(node.args[0])
        if not isinstance(node, relax.Call):
            return None
    bias = None
    if node.op == op_add:
        a, c = node.args
        cb = const_array(c)
        if cb is None:
            a, c = c, a
            cb = const_array(c)
        mm = inner(a)
        if cb is None or not isinstance(mm, relax.Call) or mm.op != op_matmul:
            return None
        bias = cb
        node = mm
    if node.op != op_matmul:
        return None
    x, w = node.args
    wa = const_array(w)
    if wa is None:
        # ONNX Gemm(transB=1) (torch's nn.Linear) imports as matmul(x, permute_dims(W)).
        pd = inner(w)
        if isinstance(pd, relax.Call) and pd.op == op_permute:
            axes = pd.attrs.axes
            wt = const_array(pd.args[0])
            if wt is not None and wt.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                wa = np.ascontiguousarray(wt.T)
    xs = static_shape(x)
    if wa is None or wa.ndim != 2 or xs is None or len(xs) < 2:
        return None
    if int(np.prod(xs[:-1])) > MAX_GEMV_ROWS or xs[-1] != wa.shape[0]:
        return None
    if _is_int8_matmul(node, x, wa):  # MatMulInteger (dynamic int8): int32 in, int32 out, no epilogue
        if bias is not None or relu:
            return None
        w8 = wa.astype(np.int8)
        q = quantized_input(x, inner) if int8_isa in ISAS and exact_on(int8_isa, w8) else None
        return (x, w8, None, False, None) if q is None else (q[0], w8, None, False, q[1])
    if wa.dtype != np.float32 or str(x.ty.dtype) != "float32":
        return None
    n = wa.shape[1]
    if bias is not None:
        if bias.size != n or bias.dtype != np.float32 or bias.ndim > len(xs) or bias.shape[-1] != n:
            return None
        bias = bias.reshape(n)
    return x, wa, bias, relu, None


class SubstituteGemv(RewritePass):
    """Replaces each small-batch dense layer with a constant weight by the packed (or grouped) GEMV
    kernel; ``report``: one row per layer."""

    pass_name = "SubstituteGemv"

    def rewrite(self, mod: Any) -> Any:
        from tvm import relax

        def rewrite_for(func: Any) -> Any:
            if not isinstance(func.body, relax.SeqExpr):
                return None
            bound, uses = bindings_and_uses(func)
            heads: dict[Any, Dense | DynamicLayer | StaticLayer] = {}
            inner_vars: list[Any] = []
            for var, value in bound.items():
                swallowed: list[Any] = []
                m: Dense | DynamicLayer | StaticLayer | None = match_dynamic_layer(value, bound, uses, swallowed,
                                                                                  self.cfg.int8_isa)
                if m is None:
                    swallowed = []
                    m = match_static_layer(value, bound, uses, swallowed, self.cfg.int8_isa)
                    rows = int(np.prod(static_shape(m.x)[:-1])) if m is not None else 0  # type: ignore[index]
                    if m is not None and self._grouped_int8(m.w, rows) is not None:
                        m = None  # block-sparse: the grouped int8 kernel, on the MatMulInteger alone
                if m is None:
                    swallowed = []
                    m = match_dense(value, bound, uses, swallowed, self.cfg.int8_isa)
                if m is not None:
                    heads[var] = m
                    inner_vars += swallowed
            for var in inner_vars:  # only the end of each matmul [+ add] [+ relu] chain is rewritten
                heads.pop(var, None)
            return lambda rw, binding: self._replace(rw, heads[binding.var]) if binding.var in heads else None

        return rewrite_bindings(mod, rewrite_for)

    def _replace(self, rw: Any, dense: Dense | DynamicLayer | StaticLayer) -> tuple[Any, str]:
        """The call_tir of the kernel for ``dense`` (its PrimFunc added to the module)."""
        from tvm import relax

        cfg = self.cfg
        if isinstance(dense, DynamicLayer | StaticLayer):
            return self._replace_whole(rw, dense)
        x, w, b, relu, zp = dense
        xshape = static_shape(x)
        assert xshape is not None
        mrows, k = int(np.prod(xshape[:-1])), xshape[-1]
        yshape = (*xshape[:-1], w.shape[1])
        n = w.shape[1]
        bn = choose_block_n(n, cfg.block_n, cfg.lanes)
        out_dtype = "float32"
        sparse_ok = cfg.grouped and w.dtype == np.float32 and np.mean(w == 0) > 0.3
        bs = pack_block_sparse(w, bn) if sparse_ok else None
        if bs is not None and bs.density > MAX_GROUPED_DENSITY:
            # Interleaved groups (G2GNet's mixer grouping) fill every block: pack the outputs regrouped.
            perm = regroup_columns(w, bn)
            bs = pack_block_sparse(w, bn, perm) if perm is not None else bs
        index = len(self.report)
        if bs is not None and bs.density <= MAX_GROUPED_DENSITY and mrows <= 8:  # M x BN accumulators
            name = f"edgec_grouped_gemv_{index}"
            func = grouped_gemv_kernel(bs, mrows, b is not None, relu, xshape, yshape)
            bp = b if b is None or bs.perm is None else b[bs.perm]  # the kernel adds bias in packed order
            oidx = bs.perm if bs.perm is not None else np.zeros((1,), np.int32)
            args = [relax.const(bs.kptr), relax.const(bs.kidx), relax.const(bs.wv),
                    relax.const(bp if bp is not None else np.zeros((1,), np.float32)), relax.const(oidx)]
            kname, extra = GROUPED_NAME, {"density": round(bs.density, 4), "regrouped": bs.perm is not None}
        elif zp is not None and (bq := self._grouped_int8(w, mrows)) is not None:
            name = f"edgec_grouped_gemv_i8_{index}"
            func = grouped_dot_kernel(bq, mrows, cfg.int8_isa, xshape, yshape)
            oidx = bq.perm if bq.perm is not None else np.zeros((1,), np.int32)
            args = [rw.visit_expr(zp), *(relax.const(a) for a in (bq.gptr, bq.gidx, bq.wv, bq.colsum, oidx))]
            bn, out_dtype = bq.block_n, "int32"
            kname, extra = GROUPED_I8_NAME, {"isa": cfg.int8_isa, "density": round(bq.density, 4),
                                             "regrouped": bq.perm is not None, "gather": bq.gather}
        elif zp is not None:  # int8 on the CPU's dot products
            isa = ISAS[cfg.int8_isa]
            bn = choose_block_n(n, cfg.block_n, isa.lanes)
            name = f"edgec_gemv_i8_{index}"
            func = dot_kernel(DotParams(m=mrows, k=k, n=n, block_n=bn, unroll=cfg.unroll, isa=isa.name,
                                        x_shape=xshape, y_shape=yshape))
            args = [rw.visit_expr(zp), relax.const(pack_int8(w, bn, isa.lanes)), relax.const(column_sums(w))]
            kname, extra, out_dtype = GEMV_I8_NAME, {"isa": isa.name}, "int32"
        elif w.dtype == np.int8:
            name = f"edgec_gemv_i8_{index}"
            p = GemvParams(m=mrows, k=k, n=n, block_n=bn, unroll=cfg.unroll, bias=False, relu=False,
                           x_shape=xshape, y_shape=yshape, x_dtype="int32", w_dtype="int8", acc_dtype="int32")
            func = gemv_kernel(p)
            args = [relax.const(pack_weight(w, bn)), relax.const(np.zeros((1,), np.int32))]
            kname, extra, out_dtype = GEMV_I8_NAME, {"isa": "none"}, "int32"
        else:
            name = f"edgec_gemv_{index}"
            p = GemvParams(m=mrows, k=k, n=n, block_n=bn, unroll=cfg.unroll, bias=b is not None, relu=relu,
                           x_shape=xshape, y_shape=yshape)
            func = gemv_kernel(p)
            args = [relax.const(pack_weight(w, bn)), relax.const(b if b is not None else np.zeros((1,), np.float32))]
            kname, extra = GEMV_NAME, {}
        # Every kernel builder names its PrimFunc alike: give each instance its own symbol.
        gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
        self.report.append({"kernel": kname, "func": name, "m": mrows, "k": k, "n": n, "block_n": bn,
                            "bias": b is not None, "relu": relu, **extra})
        # The kernels take x / y in the graph's shapes (e.g. (1, 1, K)) and view them flat.
        return relax.call_tir(gv, [rw.visit_expr(x), *args], relax.TensorType(yshape, out_dtype)), "gemv"


    def _replace_whole(self, rw: Any, layer: DynamicLayer | StaticLayer) -> tuple[Any, str]:
        """The call_tir of a whole int8 layer kernel, float in and float out: the packed GEMV on dot products,
        or for a block-sparse dynamic layer the grouped one."""
        from tvm import relax

        cfg, w = self.cfg, layer.w
        isa = ISAS[cfg.int8_isa]
        xshape = static_shape(layer.x)
        assert xshape is not None
        mrows, k, n = int(np.prod(xshape[:-1])), xshape[-1], w.shape[1]
        yshape = (*xshape[:-1], n)
        has_bias = layer.bias is not None
        b = layer.bias if layer.bias is not None else np.zeros((1,), np.float32)
        index = len(self.report)
        bq = self._grouped_int8(w, mrows) if isinstance(layer, DynamicLayer) else None
        extra: dict[str, Any]
        if isinstance(layer, DynamicLayer) and bq is not None:
            # block-sparse: the grouped kernel, scales and bias in packed column order
            name, bn, kname = f"edgec_grouped_gemv_i8_{index}", bq.block_n, GROUPED_I8_NAME
            func = grouped_dot_kernel(bq, mrows, isa.name, xshape, yshape, dynamic=True, bias=has_bias,
                                      relu=layer.relu)
            order = bq.perm if bq.perm is not None else np.arange(n)
            packed = np.zeros((2, len(bq.colsum)), np.float32)
            packed[0, :n] = layer.wscale[order]
            if layer.bias is not None:
                packed[1, :n] = layer.bias[order]
            oidx = bq.perm if bq.perm is not None else np.zeros((1,), np.int32)
            consts = [bq.gptr, bq.gidx, bq.wv, bq.colsum, packed[0], packed[1] if has_bias else packed[1, :1], oidx]
            extra = {"density": round(bq.density, 4), "regrouped": bq.perm is not None, "gather": bq.gather}
        else:
            name, kname = f"edgec_gemv_i8_{index}", GEMV_I8_NAME
            bn = choose_block_n(n, cfg.block_n, isa.lanes)
            p = DotParams(m=mrows, k=k, n=n, block_n=bn, unroll=cfg.unroll, isa=isa.name, x_shape=xshape,
                          y_shape=yshape, bias=has_bias)
            if isinstance(layer, DynamicLayer):
                p, scale, extra = dataclasses.replace(p, dynamic=True, relu=layer.relu), layer.wscale, {}
            else:
                p = dataclasses.replace(p, x_scale=layer.x_scale, x_zero=layer.x_zero, post=layer.post)
                scale = layer.scale
                extra = {"relu": ("relu", 0.0, 0) in layer.post, "static_quantization": True,
                         "post": [op for op, _, _ in layer.post]}
            func = dot_kernel(p)
            consts = [pack_int8(w, bn, isa.lanes), column_sums(w), scale, b]
        if isinstance(layer, DynamicLayer):
            extra = {"relu": layer.relu, "dynamic_quantization": True, **extra}
        gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
        self.report.append({"kernel": kname, "func": name, "m": mrows, "k": k, "n": n, "block_n": bn,
                            "bias": has_bias, "isa": isa.name, **extra})
        args = [rw.visit_expr(layer.x), *(relax.const(a) for a in consts)]
        return relax.call_tir(gv, args, relax.TensorType(yshape, "float32")), "gemv"

    def _grouped_int8(self, w: np.ndarray, mrows: int) -> BlockSparseInt8 | None:
        """The block-sparse int8 packing of ``w`` when the grouped kernel is on and it keeps at most
        MAX_GROUPED_DENSITY of the rows (outputs regrouped where that keeps fewer), else None."""
        cfg = self.cfg
        if not cfg.grouped or mrows > 8 or np.mean(w == 0) <= 0.3:
            return None
        bn = choose_block_n(w.shape[1], cfg.block_n, ISAS[cfg.int8_isa].lanes)
        bq = pack_block_sparse_int8(w, bn)
        if bq.density > MAX_GROUPED_DENSITY:
            perm = regroup_columns(w, bn)
            bq = pack_block_sparse_int8(w, bn, perm) if perm is not None else bq
        return bq if bq.density <= MAX_GROUPED_DENSITY else None


__all__ = ["MAX_GEMV_ROWS", "DynamicLayer", "StaticLayer", "SubstituteGemv", "match_dense", "match_dynamic_layer",
           "match_static_layer"]
