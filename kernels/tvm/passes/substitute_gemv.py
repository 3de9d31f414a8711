"""Substitute hand-written TIR kernels into an imported Relax module, by pattern.

Runs right after ONNX import (before legalization), on the Relax graph:

- ``matmul(x, W) [+ b] [relu]`` with ``W`` a 2-D constant and ``x`` of shape (M, K), M small
  -> one ``call_tir`` of the packed GEMV kernel (``kernels.tvm.gemv``), with the weight re-laid out
  at compile time into a new constant. The now-dead matmul/add bindings are removed afterwards.

Only what the profile's ``[kernels]`` table selects is substituted; everything else stays on the
generic lowering (and MetaSchedule tuning, when asked for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.tvm import kan, lif
from kernels.tvm.block_sparse import KERNEL_NAME as GROUPED_NAME
from kernels.tvm.block_sparse import grouped_gemv_kernel, pack_block_sparse, regroup_columns
from kernels.tvm.gemv import KERNEL_NAME_INT8 as GEMV_I8_NAME
from kernels.tvm.gemv import GemvParams, choose_block_n, gemv_kernel, pack_weight

# Rows above this go to the generic (tunable) matmul: the GEMV kernel re-reads each weight block once
# per block of rows, which stops paying against a tiled GEMM somewhere past the T*B of a spiking layer.
MAX_GEMV_ROWS = 64
# A sparse weight goes to the grouped kernel when its blocks keep at most this share of the rows:
# above it, index loads and short row runs cost more than the skipped zeros save.
MAX_GROUPED_DENSITY = 0.6


@dataclass(frozen=True)
class KernelConfig:
    """The profile's kernel choices, as the substitution needs them."""

    gemv: bool
    grouped: bool
    kan: bool
    lif: bool
    lif_layer_max_rows: int
    lanes: int
    block_n: int
    unroll: int

    @staticmethod
    def from_profile(profile: Any) -> KernelConfig:
        k = profile.kernels
        return KernelConfig(gemv=k.use_gemv, grouped=k.use_grouped_matmul, kan=k.use_fused_kan, lif=k.use_fused_lif,
                            lif_layer_max_rows=k.lif_layer_max_rows,
                            lanes=k.vector_lanes, block_n=k.gemv_block_n,
                            unroll=k.unroll)


@dataclass
class SubstitutionReport:
    """Which layers got which kernel (kept in the artifact meta)."""

    replaced: list[dict[str, Any]] = field(default_factory=list)


def _const_array(expr: Any) -> np.ndarray | None:
    import tvm

    # TVM 0.27 names Relax constants ir.GenericConst, holding the tensor in ``value``.
    if isinstance(expr, tvm.ir.expr.GenericConst):
        v = expr.value
        return v.numpy() if hasattr(v, "numpy") else None
    return None


def _static_shape(expr: Any) -> tuple[int, ...] | None:
    from tvm import relax

    sinfo = getattr(expr, "ty", None)  # TVM 0.27: struct info became ``ty`` (relax.TensorType)
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    try:
        return tuple(int(d) for d in sinfo.shape.values)
    except (TypeError, AttributeError):
        return None


def _is_int8_matmul(call: Any, x: Any, w: np.ndarray) -> bool:
    """matmul(x: int32, W: integer constant within int8, out_dtype=int32): ONNX MatMulInteger."""
    out = str(getattr(call.attrs, "out_dtype", "")) if call.attrs is not None else ""
    return (out == "int32" and str(getattr(x.ty, "dtype", "")) == "int32" and np.issubdtype(w.dtype, np.integer)
            and w.size > 0 and int(w.min()) >= -128 and int(w.max()) <= 127)


def densify_grouped(mod: Any) -> Any:
    """Rewrite ``reshape(matmul(take(x, idx, axis=-1), Wg))`` (the ``modular`` pass's Gather + batched
    MatMul, constants folded) back to ``matmul(x, W)`` with the block-diagonal dense constant W, so the
    GEMV matcher sees one dense layer and the grouped kernel skips its zero blocks itself."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op_take = tvm.ir.Op.get("relax.take")
    op_matmul = tvm.ir.Op.get("relax.matmul")
    op_reshape = tvm.ir.Op.get("relax.reshape")
    op_gather_elements = tvm.ir.Op.get("relax.gather_elements")

    @mutator
    class _Densify(PyExprMutator):
        def visit_var_binding_(self, binding: Any) -> None:
            v = binding.value
            dense = self._dense(v)
            if dense is None:
                super().visit_var_binding_(binding)
                return
            x, w = dense
            new_var = self.builder_.emit(relax.op.matmul(self.visit_expr(x), relax.const(w)), "grouped")
            self.set_var_remap(binding.var, new_var)

        def _val(self, e: Any) -> Any:
            return self.lookup_binding(e) if isinstance(e, relax.Var) else e

        def _dense(self, v: Any) -> tuple[Any, np.ndarray] | None:
            if not (isinstance(v, relax.Call) and v.op == op_reshape):
                return None
            mm = self._val(v.args[0])
            if not (isinstance(mm, relax.Call) and mm.op == op_matmul):
                return None
            tk = self._val(mm.args[0])
            wg = _const_array(mm.args[1])
            if not isinstance(tk, relax.Call) or wg is None or wg.ndim != 3:
                return None
            if tk.op == op_reshape:  # GatherElements(x, idx[1, G*K], axis=1) -> Reshape [1, G, 1, K]
                ge = self._val(tk.args[0])
                if not (isinstance(ge, relax.Call) and ge.op == op_gather_elements and int(ge.attrs.axis) in (1, -1)):
                    return None
                tk = ge
            elif tk.op != op_take or int(tk.attrs.axis) not in (-1, 1):
                return None
            idx = _const_array(tk.args[1])
            x = tk.args[0]
            xs, out = _static_shape(x), _static_shape(v)
            g, kg, ng = wg.shape
            if idx is None or xs is None or out is None or len(xs) != 2 or xs[0] != 1 or out != (1, g * ng):
                return None
            if idx.size != g * kg or wg.dtype != np.float32:
                return None
            idx = idx.reshape(g, kg)
            if idx.min() < 0 or idx.max() >= xs[1]:
                return None
            w = np.zeros((xs[1], g * ng), np.float32)
            for j in range(g):  # duplicate (padding) indices carry zero rows: accumulate, never overwrite
                np.add.at(w[:, j * ng:(j + 1) * ng], idx[j], wg[j])
            return x, w

    rw = _Densify(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rw.builder_.get())


def fuse_kan(mod: Any, cfg: KernelConfig, report: SubstitutionReport) -> Any:
    """Replace ``matmul(reshape(B(z)), W)`` (a KAN layer's basis expansion + contraction, W constant)
    by one fused kernel reading z; see ``kernels.tvm.kan``."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op_matmul = tvm.ir.Op.get("relax.matmul")
    op_reshape = tvm.ir.Op.get("relax.reshape")

    counter = [0]

    @mutator
    class _Kan(PyExprMutator):
        def _val(self, e: Any) -> Any:
            return self.lookup_binding(e) if isinstance(e, relax.Var) else None

        def visit_var_binding_(self, binding: Any) -> None:
            v = binding.value
            plan = None
            if isinstance(v, relax.Call) and v.op == op_matmul:
                w = _const_array(v.args[1])
                rs = self._val(v.args[0])
                if w is not None and w.ndim == 2 and isinstance(rs, relax.Call) and rs.op == op_reshape:
                    plan = self._plan(rs.args[0], w, v)
            if plan is None:
                super().visit_var_binding_(binding)
                return
            g, n, kk, w, yshape = plan
            name = f"edgec_kan_{counter[0]}"
            counter[0] += 1
            func = kan.fused_kan_kernel(g, n, kk, w.shape[1], cfg.lanes, _static_shape(g.root), yshape)
            gv = self.builder_.add_func(func.with_attr("global_symbol", name), name)
            call = relax.call_tir(gv, [self.visit_expr(g.root), relax.const(kan.pack_coefficients(w, cfg.lanes))],
                                  relax.TensorType(yshape, "float32"))
            self.set_var_remap(binding.var, self.builder_.emit(call, "kan"))
            report.replaced.append({"kernel": kan.KERNEL_NAME, "func": name, "in": n, "basis": kk,
                                    "out": int(w.shape[1]), "nodes": len(g.nodes)})

        def _plan(self, vexpr: Any, w: np.ndarray, mm: Any) -> Any:
            vs, ys = _static_shape(vexpr), _static_shape(mm)
            if vs is None or ys is None or len(vs) < 2 or int(np.prod(vs[:-2])) != 1:
                return None
            n, kk = vs[-2], vs[-1]
            if kk < 2 or w.shape[0] != n * kk or w.shape[1] > kan.MAX_OUT or int(np.prod(ys[:-1])) != 1:
                return None
            try:
                g = kan.extract_basis(vexpr, self._val, _const_array)
            except kan.NoMatch:
                return None
            if _static_shape(g.root) is None or int(np.prod(_static_shape(g.root))) != n:
                return None
            return g, n, kk, w.astype(np.float32), ys

    rw = _Kan(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rw.builder_.get())


def fuse_lif(mod: Any, cfg: KernelConfig, report: SubstitutionReport) -> Any:
    """Replace an unrolled spiking recurrence (``concat`` over T steps of elementwise ops on row slices
    of one current matrix C) by one fused kernel; where C is a constant-weight matmul [+ bias], by one
    event-driven kernel for the whole layer (matmul included); see ``kernels.tvm.lif``."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op_concat = tvm.ir.Op.get("relax.concat")
    op_add, op_matmul = tvm.ir.Op.get("relax.add"), tvm.ir.Op.get("relax.matmul")
    op_permute = tvm.ir.Op.get("relax.permute_dims")
    counter = [0]

    @mutator
    class _Lif(PyExprMutator):
        def _val(self, e: Any) -> Any:
            return self.lookup_binding(e) if isinstance(e, relax.Var) else None

        def visit_var_binding_(self, binding: Any) -> None:
            v = binding.value
            g = None
            if (isinstance(v, relax.Call) and v.op == op_concat and int(v.attrs.axis) == 0
                    and isinstance(v.args[0], relax.Tuple) and len(v.args[0].fields) >= 2):
                try:
                    g = lif.extract_recurrence(v, self._val, _const_array)
                except lif.NoMatch:
                    g = None
            if g is None or _static_shape(v) != (g.rows, _static_shape(g.source)[1]):  # type: ignore[index]
                super().visit_var_binding_(binding)
                return
            t, n = _static_shape(v)  # type: ignore[misc]
            name = f"edgec_lif_{counter[0]}"
            counter[0] += 1
            # Up to lif_layer_max_rows (T*B) rows the whole layer is one event-driven kernel; beyond, the
            # matmul is left to the packed GEMV and only the recurrence is fused (see KernelSpec).
            layer = self._layer(g.source, n) if g.rows <= cfg.lif_layer_max_rows else None
            if layer is not None:  # C = S @ W [+ b]: matmul and recurrence in one event-driven kernel
                s_in, w, b = layer
                bn = lif.layer_block_n(g.rows, cfg.lanes)
                wp, bp = lif.pack_layer(w, b, bn)
                func = lif.fused_layer_kernel(g, w.shape[0], n, bn, b is not None, _static_shape(s_in))
                args = [self.visit_expr(s_in), relax.const(wp), relax.const(bp)]
                info = {"kernel": lif.LAYER_KERNEL_NAME, "in": int(w.shape[0]), "block_n": bn}
            else:
                func = lif.fused_recurrence_kernel(g, n, cfg.lanes)
                args = [self.visit_expr(g.source)]
                info = {"kernel": lif.KERNEL_NAME}
            gv = self.builder_.add_func(func.with_attr("global_symbol", name), name)
            call = relax.call_tir(gv, args, relax.TensorType((t, n), "float32"))
            self.set_var_remap(binding.var, self.builder_.emit(call, "lif"))
            report.replaced.append({**info, "func": name, "steps": t, "neurons": n, "nodes": len(g.nodes)})

        def _layer(self, c: Any, n: int) -> tuple[Any, np.ndarray, np.ndarray | None] | None:
            """(S, W, b) when ``c`` is ``matmul(S, W) [+ b]`` with W a constant (K, N) (or ONNX Gemm's
            ``permute_dims`` of one) and S float32 (R, K); None otherwise."""
            v = self._val(c)
            b = None
            if isinstance(v, relax.Call) and v.op == op_add:
                for mm_e, b_e in ((v.args[0], v.args[1]), (v.args[1], v.args[0])):
                    cb = _const_array(b_e)
                    if cb is not None and cb.size == n and cb.dtype == np.float32 and cb.shape[-1] == n:
                        b, v = cb.reshape(n), self._val(mm_e)
                        break
                else:
                    return None
            if not (isinstance(v, relax.Call) and v.op == op_matmul):
                return None
            s_in, w_e = v.args
            w = _const_array(w_e)
            if w is None:
                pd = self._val(w_e)
                if isinstance(pd, relax.Call) and pd.op == op_permute:
                    wt = _const_array(pd.args[0])
                    axes = pd.attrs.axes
                    if wt is not None and wt.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                        w = np.ascontiguousarray(wt.T)
            ss = _static_shape(s_in)
            if (w is None or w.ndim != 2 or w.dtype != np.float32 or w.shape[1] != n or ss is None or len(ss) != 2
                    or ss[1] != w.shape[0] or str(s_in.ty.dtype) != "float32"):
                return None
            return s_in, w, b

    rw = _Lif(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rw.builder_.get())


def substitute_kernels(mod: Any, cfg: KernelConfig) -> tuple[Any, SubstitutionReport]:
    """Return ``mod`` with matching layers replaced by hand-written kernels, and what was replaced."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    report = SubstitutionReport()
    if cfg.kan:
        mod = fuse_kan(relax.transform.FoldConstant()(mod), cfg, report)
    if cfg.lif:
        mod = fuse_lif(relax.transform.FoldConstant()(mod), cfg, report)
    if not cfg.gemv:  # the grouped kernel is a GEMV variant: "generic" turns both off
        return mod, report
    if cfg.grouped:
        # Folding makes the modular pass's gather indices (computed from shape_of) plain constants.
        mod = densify_grouped(relax.transform.FoldConstant()(mod))
    op_matmul = tvm.ir.Op.get("relax.matmul")
    op_add = tvm.ir.Op.get("relax.add")
    op_relu = tvm.ir.Op.get("relax.nn.relu")
    op_permute = tvm.ir.Op.get("relax.permute_dims")

    def bindings_of(func: Any) -> tuple[dict[Any, Any], dict[Any, int]]:
        """var -> bound value, and var -> number of uses, over the function's blocks."""
        bound: dict[Any, Any] = {}
        uses: dict[Any, int] = {}

        def count(e: Any) -> None:
            if isinstance(e, relax.Var):
                uses[e] = uses.get(e, 0) + 1

        for blk in func.body.blocks:
            for bnd in blk.bindings:
                if isinstance(bnd, relax.VarBinding):
                    bound[bnd.var] = bnd.value
                    relax.analysis.post_order_visit(bnd.value, count)
        relax.analysis.post_order_visit(func.body.body, count)
        return bound, uses

    def match(call: Any, bound: dict[Any, Any], uses: dict[Any, int], absorbed: list[Any]) -> tuple[Any, np.ndarray, np.ndarray | None, bool] | None:
        """(x, W, b, relu) when ``call`` ends a dense layer with a constant weight; the inner
        bindings it swallows are appended to ``absorbed``."""

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
            cb = _const_array(c)
            if cb is None:
                a, c = c, a
                cb = _const_array(c)
            mm = inner(a)
            if cb is None or not isinstance(mm, relax.Call) or mm.op != op_matmul:
                return None
            bias = cb
            node = mm
        if node.op != op_matmul:
            return None
        x, w = node.args
        wa = _const_array(w)
        if wa is None:
            # ONNX Gemm(transB=1) (torch's nn.Linear) imports as matmul(x, permute_dims(W)).
            pd = inner(w)
            if isinstance(pd, relax.Call) and pd.op == op_permute:
                axes = pd.attrs.axes
                wt = _const_array(pd.args[0])
                if wt is not None and wt.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                    wa = np.ascontiguousarray(wt.T)
        xs = _static_shape(x)
        if wa is None or wa.ndim != 2 or xs is None or len(xs) < 2:
            return None
        if int(np.prod(xs[:-1])) > MAX_GEMV_ROWS or xs[-1] != wa.shape[0]:
            return None
        if _is_int8_matmul(node, x, wa):  # MatMulInteger (dynamic int8): int32 in, int32 out, no epilogue
            return (x, wa.astype(np.int8), None, False) if bias is None and not relu else None
        if wa.dtype != np.float32 or str(x.ty.dtype) != "float32":
            return None
        n = wa.shape[1]
        if bias is not None:
            if bias.size != n or bias.dtype != np.float32 or bias.ndim > len(xs) or bias.shape[-1] != n:
                return None
            bias = bias.reshape(n)
        return x, wa, bias, relu

    @mutator
    class _Rewriter(PyExprMutator):
        def __init__(self, m: Any) -> None:
            super().__init__(m)
            self.heads: dict[Any, tuple[Any, np.ndarray, np.ndarray | None, bool]] = {}
            self.count = 0

        def visit_var_binding_(self, binding: Any) -> None:
            m = self.heads.get(binding.var)
            if m is None:
                super().visit_var_binding_(binding)
                return
            x, w, b, relu = m
            xshape = _static_shape(x)
            assert xshape is not None
            mrows, k = int(np.prod(xshape[:-1])), xshape[-1]
            yshape = (*xshape[:-1], w.shape[1])
            n = w.shape[1]
            bn = choose_block_n(n, cfg.block_n, cfg.lanes)
            bc = relax.const(b if b is not None else np.zeros((1,), np.float32))
            out_dtype = "float32"
            sparse_ok = cfg.grouped and w.dtype == np.float32 and np.mean(w == 0) > 0.3
            bs = pack_block_sparse(w, bn) if sparse_ok else None
            if bs is not None and bs.density > MAX_GROUPED_DENSITY:
                # Interleaved groups (G2GNet's mixer grouping) fill every block: pack the outputs regrouped.
                perm = regroup_columns(w, bn)
                bs = pack_block_sparse(w, bn, perm) if perm is not None else bs
            if bs is not None and bs.density <= MAX_GROUPED_DENSITY and mrows <= 8:  # M x BN accumulators
                name = f"edgec_grouped_gemv_{self.count}"
                func = grouped_gemv_kernel(bs, mrows, b is not None, relu, xshape, yshape)
                bp = b if b is None or bs.perm is None else b[bs.perm]  # the kernel adds bias in packed order
                oidx = bs.perm if bs.perm is not None else np.zeros((1,), np.int32)
                args = [relax.const(bs.kptr), relax.const(bs.kidx), relax.const(bs.wv),
                        relax.const(bp if bp is not None else np.zeros((1,), np.float32)), relax.const(oidx)]
                kname, extra = GROUPED_NAME, {"density": round(bs.density, 4), "regrouped": bs.perm is not None}
            elif w.dtype == np.int8:
                name = f"edgec_gemv_i8_{self.count}"
                p = GemvParams(m=mrows, k=k, n=n, block_n=bn, unroll=cfg.unroll, bias=False, relu=False,
                               x_shape=xshape, y_shape=yshape, x_dtype="int32", w_dtype="int8", acc_dtype="int32")
                func = gemv_kernel(p)
                args = [relax.const(pack_weight(w, bn)), relax.const(np.zeros((1,), np.int32))]
                kname, extra, out_dtype = GEMV_I8_NAME, {}, "int32"
            else:
                name = f"edgec_gemv_{self.count}"
                p = GemvParams(m=mrows, k=k, n=n, block_n=bn, unroll=cfg.unroll, bias=b is not None, relu=relu,
                               x_shape=xshape, y_shape=yshape)
                func = gemv_kernel(p)
                args = [relax.const(pack_weight(w, bn)), bc]
                kname, extra = "gemv-packed-f32", {}
            self.count += 1
            # TVMScript names every kernel by its Python function: give each instance its own symbol.
            gv = self.builder_.add_func(func.with_attr("global_symbol", name), name)
            report.replaced.append({"kernel": kname, "func": name, "m": mrows, "k": k, "n": n, "block_n": bn,
                                    "bias": b is not None, "relu": relu, **extra})
            # The kernels take x / y in the graph's shapes (e.g. (1, 1, K)) and view them flat.
            call = relax.call_tir(gv, [self.visit_expr(x), *args], relax.TensorType(yshape, out_dtype))
            new_var = self.builder_.emit(call, "gemv")
            self.set_var_remap(binding.var, new_var)

    rw = _Rewriter(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            bound, uses = bindings_of(func)
            rw.heads = {}
            inner_vars: list[Any] = []
            for var, value in bound.items():
                swallowed: list[Any] = []
                m = match(value, bound, uses, swallowed)
                if m is not None:
                    rw.heads[var] = m
                    inner_vars += swallowed
            for var in inner_vars:  # only the end of each matmul [+ add] [+ relu] chain is rewritten
                rw.heads.pop(var, None)
            new = rw.visit_expr(func)
            rw.builder_.update_func(gv, new)
    out = rw.builder_.get()
    out = relax.transform.DeadCodeElimination()(out)
    return out, report


__all__ = ["KernelConfig", "SubstitutionReport", "substitute_kernels"]
