"""fuse-lif: an unrolled spiking recurrence as one fused kernel (``kernels.tvm.tir.lif``).

Matches ``concat((p_0, ..., p_{T-1}), axis=0)`` whose parts are elementwise graphs over row slices of one
current matrix C and scalar constants (``extract_recurrence``; the LIF shape is not hard-coded). Where C
is a constant-weight matmul [+ bias] and the layer has at most ``lif_layer_max_rows`` rows, the matmul
goes into the kernel too (the event-driven layer kernel); where C is the int8 pass's dynamic-int8 layer
(``substitute_gemv.match_dynamic_layer``: DynamicQuantizeLinear, MatMulInteger, the scales [+ bias]) on a
CPU with int8 dot products, the int8 layer kernel (int8 weights, spikes as quantized bytes); otherwise only
the recurrence is fused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels.tvm.passes._rewrite import (
    NoMatch,
    RewritePass,
    bindings_and_uses,
    const_array,
    const_ints,
    require_shape,
    rewrite_bindings,
    static_shape,
    value_of,
)
from kernels.tvm.passes.substitute_gemv import DynamicLayer, match_dynamic_layer
from kernels.tvm.tir import lif
from kernels.tvm.tir._elementwise import BINARY, CONST, ROW, UNARY, Node
from kernels.tvm.tir.bf16 import bf16_constant_array, to_bf16_bits
from kernels.tvm.tir.int8_dot import ISAS, column_sums, pack_int8

# The Relax elementwise ops a recurrence may use (all in the shared op table).
UNARY_OPS = ("negative", "floor", "exp", "tanh", "sigmoid", "abs")
BINARY_OPS = ("add", "subtract", "multiply", "divide", "greater", "greater_equal", "less", "less_equal",
              "maximum", "minimum", "logical_and", "logical_or")


def extract_recurrence(concat: Any, lookup: Any, whole_input: bool = False) -> lif.Recurrence:
    """The graph behind ``concat((p_0, ..., p_{T-1}), axis=0)`` with every p_t of shape (1, N),
    ``lookup(var)`` giving a variable's bound value; raises NoMatch. ``whole_input``: the parts are
    elementwise graphs of one (1, N) float32 tensor itself (``source``, one row) instead of row slices, e.g. a
    spiking net's rate code of its input image."""
    import tvm
    from tvm import relax

    slicing = () if whole_input else ("strided_slice",)
    own_ops = {f"relax.{name}" for name in (*UNARY_OPS, *BINARY_OPS, "astype", *slicing)}

    parts = list(concat.args[0].fields)
    part_shape = require_shape(parts[0])
    if len(part_shape) != 2 or part_shape[0] != 1 or any(require_shape(p) != part_shape for p in parts):
        raise NoMatch("parts are not (1, N)")
    n = part_shape[1]
    g = lif.Recurrence()
    memo: dict[Any, int] = {}

    def add(node: Node) -> int:
        g.nodes.append(node)
        return len(g.nodes) - 1

    def visit(e: Any) -> int:
        if e in memo:
            return memo[e]
        c = const_array(e)
        if c is not None:
            a = np.asarray(c, dtype=np.float64).reshape(-1)
            if a.size == 0 or not np.all(a == a[0]):
                raise NoMatch("non-uniform constant")
            nid = add(Node(CONST, values=(float(a[0]),)))
        else:
            val = lookup(e) if isinstance(e, relax.Var) else e
            computed = isinstance(val, relax.Call) and isinstance(val.op, tvm.ir.Op) and val.op.name in own_ops
            if whole_input and isinstance(e, relax.Var) and not computed:
                if require_shape(e) != (1, n) or str(e.ty.dtype) != "float32":
                    raise NoMatch("input leaf is not (1, N) float32")
                if g.source is None:
                    g.source, g.rows = e, 1
                elif not g.source.same_as(e):
                    raise NoMatch("two input tensors")
                nid = add(Node(ROW, start=0))
            elif not isinstance(val, relax.Call) or not isinstance(val.op, tvm.ir.Op):
                raise NoMatch("leaf that is not a row slice")
            else:
                nid = visit_call(val)
        memo[e] = nid
        return nid

    def visit_call(call: Any) -> int:
        name = call.op.name.removeprefix("relax.")
        if require_shape(call) not in ((1, n), (n,)):
            raise NoMatch(f"{name} on another shape")
        if name == "strided_slice":
            src = call.args[0]
            axes, begin, end = const_ints(call.args[1]), const_ints(call.args[2]), const_ints(call.args[3])
            strides = const_ints(call.args[4]) if len(call.args) > 4 else [1]
            ss = require_shape(src)
            if axes != [0] or strides != [1] or len(ss) != 2 or ss[1] != n or end[0] - begin[0] != 1:
                raise NoMatch("slice is not one row")
            if g.source is None:
                g.source, g.rows = src, ss[0]
            elif not g.source.same_as(src):
                raise NoMatch("rows of two tensors")
            return add(Node(ROW, start=begin[0] % ss[0]))
        if name == "astype":
            if str(call.attrs.dtype) not in ("float32", "bool"):
                raise NoMatch("astype")
            a = visit(call.args[0])
            return a if str(call.attrs.dtype) == "float32" else add(Node(UNARY, op="to_bool", args=(a,)))
        if name in UNARY_OPS:
            return add(Node(UNARY, op=name, args=(visit(call.args[0]),)))
        if name in BINARY_OPS:
            return add(Node(BINARY, op=name, args=(visit(call.args[0]), visit(call.args[1]))))
        raise NoMatch(f"op {name}")

    g.outputs = [visit(p) for p in parts]
    if g.source is None or g.rows != (1 if whole_input else len(parts)):
        raise NoMatch("outputs do not follow the rows of one tensor")
    return g


class FuseLif(RewritePass):
    """Folds constants, then replaces each unrolled recurrence by one fused kernel (with its matmul where
    it can); ``report``: one row per layer."""

    pass_name = "FuseLif"

    def rewrite(self, mod: Any) -> Any:
        import tvm
        from tvm import relax

        op_concat = tvm.ir.Op.get("relax.concat")
        op_add, op_matmul = tvm.ir.Op.get("relax.add"), tvm.ir.Op.get("relax.matmul")
        op_permute = tvm.ir.Op.get("relax.permute_dims")
        cfg = self.cfg

        def layer(rw: Any, c: Any, n: int) -> tuple[Any, np.ndarray, np.ndarray | None] | None:
            """(S, W, b) when ``c`` is ``matmul(S, W) [+ b]`` with W a constant (K, N) (or ONNX Gemm's
            ``permute_dims`` of one) and S float32 (R, K); None otherwise."""
            v = value_of(rw, c)
            b = None
            if isinstance(v, relax.Call) and v.op == op_add:
                for mm_e, b_e in ((v.args[0], v.args[1]), (v.args[1], v.args[0])):
                    cb = const_array(b_e)
                    if cb is not None and cb.size == n and cb.dtype == np.float32 and cb.shape[-1] == n:
                        b, v = cb.reshape(n), value_of(rw, mm_e)
                        break
                else:
                    return None
            if not (isinstance(v, relax.Call) and v.op == op_matmul):
                return None
            s_in, w_e = v.args
            w = const_array(w_e)
            if w is None:
                pd = value_of(rw, w_e)
                if isinstance(pd, relax.Call) and pd.op == op_permute:
                    wt = const_array(pd.args[0])
                    axes = pd.attrs.axes
                    if wt is not None and wt.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                        w = np.ascontiguousarray(wt.T)
            ss = static_shape(s_in)
            if (w is None or w.ndim != 2 or w.dtype != np.float32 or w.shape[1] != n or ss is None or len(ss) != 2
                    or ss[1] != w.shape[0] or str(s_in.ty.dtype) != "float32"):
                return None
            return s_in, w, b

        def int8_layer(c: Any, bound: dict[Any, Any], uses: dict[Any, int]) -> DynamicLayer | None:
            """The dynamic-int8 layer (no relu) whose output is ``c``, on a CPU with int8 dot products."""
            if not isinstance(c, relax.Var) or c not in bound:
                return None
            dyn = match_dynamic_layer(bound[c], bound, uses, [], cfg.int8_isa)
            ss = static_shape(dyn.x) if dyn is not None else None
            if dyn is None or dyn.relu or ss is None or len(ss) != 2:
                return None
            return dyn

        def input_code(rw: Any, s_in: Any, k: int) -> lif.Recurrence | None:
            """The per-step input S = ``concat(p_0 .. p_{T-1})`` as elementwise graphs of one (1, K) tensor, or None."""
            v = value_of(rw, s_in)
            if not (isinstance(v, relax.Call) and v.op == op_concat and int(v.attrs.axis) == 0
                    and isinstance(v.args[0], relax.Tuple) and len(v.args[0].fields) >= 2):
                return None
            try:
                code = extract_recurrence(v, lambda e: value_of(rw, e), whole_input=True)
            except NoMatch:
                return None
            return code if static_shape(code.source) == (1, k) else None

        def fuse(rw: Any, binding: Any, bound: dict[Any, Any], uses: dict[Any, int]) -> tuple[Any, str] | None:
            v = binding.value
            g = None
            if (isinstance(v, relax.Call) and v.op == op_concat and int(v.attrs.axis) == 0
                    and isinstance(v.args[0], relax.Tuple) and len(v.args[0].fields) >= 2):
                try:
                    g = extract_recurrence(v, lambda e: value_of(rw, e))
                except NoMatch:
                    g = None
            if g is None or static_shape(v) != (g.rows, static_shape(g.source)[1]):  # type: ignore[index]
                return None
            t, n = static_shape(v)  # type: ignore[misc]
            name = f"edgec_lif_{len(self.report)}"
            # Up to lif_layer_max_rows (T*B) rows the whole layer is one event-driven kernel; beyond, the
            # matmul is left to the packed GEMV and only the recurrence is fused (see KernelSpec).
            found = layer(rw, g.source, n) if g.rows <= cfg.lif_layer_max_rows else None
            dyn = int8_layer(g.source, bound, uses) if found is None and g.rows <= cfg.lif_layer_max_rows else None
            if dyn is not None:  # C = dynamic-int8 layer of S: quantization, int8 matmul, recurrence in one kernel
                isa = ISAS[cfg.int8_isa]
                _, bn = lif.int8_layer_tiles(g.rows, isa.lanes)
                s_in, code = dyn.x, input_code(rw, dyn.x, dyn.w.shape[0])
                if code is not None:  # S itself is elementwise in one (1, K) tensor: computed in the kernel
                    s_in = code.source
                xs = static_shape(s_in)
                assert xs is not None
                func = lif.fused_layer_int8_kernel(g, dyn.w.shape[0], n, bn, isa.name, dyn.bias is not None, xs,
                                                   input_code=code)
                cols = np.zeros((3, lif.padded_columns(n, bn, isa.lanes)), np.float32)  # zero-padded per column
                cols[0, :n], cols[1, :n] = column_sums(dyn.w), dyn.wscale
                if dyn.bias is not None:
                    cols[2, :n] = dyn.bias
                consts = [pack_int8(dyn.w, bn, isa.lanes), cols[0].astype(np.int32), cols[1],
                          cols[2] if dyn.bias is not None else cols[2, :1]]
                args = [rw.visit_expr(s_in), *(relax.const(a) for a in consts)]
                info = {"kernel": lif.LAYER_KERNEL_NAME_INT8, "in": int(dyn.w.shape[0]), "block_n": bn, "isa": isa.name,
                        "input_code": code is not None}
            elif found is not None:  # C = S @ W [+ b]: matmul and recurrence in one event-driven kernel
                s_in, w, b = found
                bn = lif.layer_block_n(g.rows, cfg.lanes)
                wp, bp = lif.pack_layer(w, b, bn)
                bits = to_bf16_bits(wp)  # weights bf16 holds exactly (the bf16 pass): stored as bf16
                func = lif.fused_layer_kernel(g, w.shape[0], n, bn, b is not None, static_shape(s_in),
                                              "float32" if bits is None else "bfloat16")
                wc = relax.const(wp) if bits is None else relax.const(bf16_constant_array(bits), "bfloat16")
                args = [rw.visit_expr(s_in), wc, relax.const(bp)]
                kname = lif.LAYER_KERNEL_NAME if bits is None else lif.LAYER_KERNEL_NAME_BF16W
                info = {"kernel": kname, "in": int(w.shape[0]), "block_n": bn}
            else:
                func = lif.fused_recurrence_kernel(g, n, cfg.lanes)
                args = [rw.visit_expr(g.source)]
                info = {"kernel": lif.KERNEL_NAME}
            gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
            self.report.append({**info, "func": name, "steps": t, "neurons": n, "nodes": len(g.nodes)})
            return relax.call_tir(gv, args, relax.TensorType((t, n), "float32")), "lif"

        def fuse_in(func: Any) -> Any:
            if not isinstance(func.body, relax.SeqExpr):
                return None
            bound, uses = bindings_and_uses(func)
            return lambda rw, binding: fuse(rw, binding, bound, uses)

        return rewrite_bindings(relax.transform.FoldConstant()(mod), fuse_in)


__all__ = ["FuseLif", "extract_recurrence"]
