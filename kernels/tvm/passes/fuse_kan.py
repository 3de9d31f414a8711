"""fuse-kan: a KAN layer's basis expansion + contraction as one fused kernel (``kernels.tvm.tir.kan``).

Matches ``matmul(reshape(B(z)), W)`` with W a constant (n*K, out): ``extract_basis`` reads the per-feature
graph B off the Relax IR (elementwise ops, comparisons, slices and concats along the basis axis,
constants shared by all features), with no knowledge of which basis it is.

After the int8 pass (dynamic) the contraction is ``DynamicQuantizeLinear`` + ``MatMulInteger`` + a scale
(substitute_gemv's ``match_dynamic_layer``) over the same reshaped basis: that layer becomes the int8 fused
kernel (``kan.fused_kan_int8_kernel``: basis fp32 in L1, quantized per call as the graph says, int8 weights
per output column on the CPU's int8 dot products) where the profile has them and they multiply W exactly.
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
from kernels.tvm.passes.substitute_gemv import match_dynamic_layer
from kernels.tvm.tir import kan
from kernels.tvm.tir._elementwise import BINARY, CONCAT, CONST, INPUT, SLICE, UNARY, Node
from kernels.tvm.tir.bf16 import bf16_constant_array, to_bf16_bits
from kernels.tvm.tir.int8_dot import ISAS, column_sums, pack_int8

# The Relax elementwise ops a basis graph may use (all in the shared op table; ``power`` only as a square).
UNARY_OPS = ("exp", "tanh", "sigmoid", "negative", "sqrt", "square")
BINARY_OPS = ("add", "subtract", "multiply", "divide", "greater_equal", "greater", "less", "less_equal",
              "logical_and", "logical_or", "maximum", "minimum", "power")


def extract_basis(v_expr: Any, lookup: Any) -> kan.BasisGraph:
    """Per-feature graph producing ``v_expr`` (shape (..., n, K)), ``lookup(var)`` giving a variable's bound
    value; raises NoMatch."""
    import tvm
    from tvm import relax

    vshape = require_shape(v_expr)
    root_shape = vshape[:-1]
    rank = len(vshape)
    g = kan.BasisGraph()
    memo: dict[Any, int] = {}

    def add(node: Node) -> int:
        g.nodes.append(node)
        return len(g.nodes) - 1

    def width_of(e: Any) -> int:
        s = require_shape(e)
        if s == root_shape or s == (*root_shape, 1):
            return 1
        if len(s) == rank and s[:-1] == root_shape:
            return s[-1]
        raise NoMatch(f"shape {s} is not per-feature")

    def const_node(arr: np.ndarray) -> int:
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim <= rank and all(d == 1 for d in a.shape[:-1]):
            return add(Node(CONST, a.size if a.ndim else 1, values=tuple(float(v) for v in a.reshape(-1))))
        if a.size and np.all(a == a.reshape(-1)[0]):  # a per-feature constant that is uniform (ones_like)
            return add(Node(CONST, 1, values=(float(a.reshape(-1)[0]),)))
        raise NoMatch("feature-dependent constant")

    def visit(e: Any) -> int:
        if e in memo:
            return memo[e]
        c = const_array(e)
        if c is not None:
            nid = const_node(c)
        elif isinstance(e, relax.Var):
            val = lookup(e)
            nid = -1
            if val is not None and isinstance(val, relax.Call) and supported(val):
                # A per-feature op on an (…, n) tensor may belong to the basis (ChebyKAN's tanh) or to
                # the previous layer (a residual add): try to extend, else this var is the input z.
                saved = (len(g.nodes), g.root, dict(memo))
                try:
                    nid = visit_call(val)
                except NoMatch:
                    if require_shape(e) != root_shape:
                        raise
                    del g.nodes[saved[0]:]
                    g.root = saved[1]
                    memo.clear()
                    memo.update(saved[2])
                    nid = -1
            if nid < 0:
                if require_shape(e) != root_shape:
                    raise NoMatch("leaf is not a (…, n) tensor")
                if g.root is not None and not g.root.same_as(e):
                    raise NoMatch("basis depends on two tensors")
                g.root = e
                nid = add(Node(INPUT))
        elif isinstance(e, relax.Call):
            nid = visit_call(e)
        else:
            raise NoMatch(f"unsupported expression {type(e).__name__}")
        memo[e] = nid
        return nid

    def supported(call: Any) -> bool:
        if not isinstance(call.op, tvm.ir.Op):
            return False
        name = call.op.name.removeprefix("relax.")
        if name not in (*UNARY_OPS, *BINARY_OPS, "astype", "expand_dims", "strided_slice", "concat"):
            return False
        try:  # ops on other shapes (e.g. the previous layer) end the basis graph
            width_of(call)
        except NoMatch:
            return False
        return True

    def visit_call(call: Any) -> int:
        name = call.op.name.removeprefix("relax.")
        w = width_of(call)
        if name in UNARY_OPS:
            return add(Node(UNARY, w, name, (visit(call.args[0]),)))
        if name in BINARY_OPS:
            a, b = visit(call.args[0]), visit(call.args[1])
            if name == "power":
                exponent = g.nodes[b]
                if exponent.kind != CONST or exponent.width != 1 or exponent.values[0] != 2.0:
                    raise NoMatch("power with an exponent other than 2")
                return add(Node(UNARY, w, "square", (a,)))
            return add(Node(BINARY, w, name, (a, b)))
        if name == "astype":
            if str(call.attrs.dtype) not in ("float32", "bool"):
                raise NoMatch(f"astype {call.attrs.dtype}")
            op = "to_bool" if str(call.attrs.dtype) == "bool" else "identity"
            return add(Node(UNARY, w, op, (visit(call.args[0]),)))
        if name == "expand_dims":
            axes = [int(a) for a in call.attrs.axis]
            if axes not in ([rank - 1], [-1]):
                raise NoMatch("expand_dims on another axis")
            return add(Node(UNARY, w, "identity", (visit(call.args[0]),)))
        if name == "strided_slice":
            axes, begin, end = const_ints(call.args[1]), const_ints(call.args[2]), const_ints(call.args[3])
            strides = const_ints(call.args[4]) if len(call.args) > 4 else [1]
            if axes not in ([rank - 1], [-1]) or strides != [1]:
                raise NoMatch("strided_slice off the basis axis")
            src = visit(call.args[0])
            lo, hi, _ = slice(begin[0], end[0]).indices(g.nodes[src].width)
            if hi - lo != w:
                raise NoMatch("slice width mismatch")
            return add(Node(SLICE, w, args=(src,), start=lo))
        if name == "concat":
            if int(call.attrs.axis) not in (rank - 1, -1):
                raise NoMatch("concat off the basis axis")
            parts = tuple(visit(p) for p in call.args[0].fields)
            if sum(g.nodes[p].width for p in parts) != w:
                raise NoMatch("concat width mismatch")
            return add(Node(CONCAT, w, args=parts))
        raise NoMatch(f"op {name}")

    g.output = visit(v_expr)
    if g.root is None:
        raise NoMatch("basis does not depend on an input")
    return g


class FuseKan(RewritePass):
    """Folds constants, then replaces each KAN layer by one fused kernel; ``report``: one row per layer."""

    pass_name = "FuseKan"

    def rewrite(self, mod: Any) -> Any:
        import tvm
        from tvm import relax

        op_matmul = tvm.ir.Op.get("relax.matmul")
        op_reshape = tvm.ir.Op.get("relax.reshape")
        lanes = self.cfg.lanes

        def plan(rw: Any, vexpr: Any, w: np.ndarray, ys: tuple[int, ...] | None) -> Any:
            vs = static_shape(vexpr)
            if vs is None or ys is None or len(vs) < 2 or int(np.prod(vs[:-2])) != 1:
                return None
            n, kk = vs[-2], vs[-1]
            if kk < 2 or w.shape[0] != n * kk or w.shape[1] > kan.MAX_OUT or int(np.prod(ys[:-1])) != 1:
                return None
            try:
                g = extract_basis(vexpr, lambda e: value_of(rw, e))
            except NoMatch:
                return None
            root_shape = static_shape(g.root)
            if root_shape is None or int(np.prod(root_shape)) != n:
                return None
            return g, n, kk, ys

        def basis_of(rw: Any, e: Any) -> Any:
            """The expression reshaped into ``e`` (the (..., n, K) basis), or None."""
            rs = value_of(rw, e)
            return rs.args[0] if isinstance(rs, relax.Call) and rs.op == op_reshape else None

        def fuse_fp32(rw: Any, v: Any) -> tuple[Any, str] | None:
            if not (isinstance(v, relax.Call) and v.op == op_matmul):
                return None
            w = const_array(v.args[1])
            vexpr = basis_of(rw, v.args[0])
            if w is None or w.ndim != 2 or vexpr is None or np.issubdtype(w.dtype, np.integer):
                return None
            found = plan(rw, vexpr, w, static_shape(v))
            if found is None:
                return None
            g, n, kk, yshape = found
            w = w.astype(np.float32)
            name = f"edgec_kan_{len(self.report)}"
            wq = kan.pack_coefficients(w, lanes)
            bits = to_bf16_bits(wq)  # coefficients bf16 holds exactly (the bf16 pass): stored as bf16
            func = kan.fused_kan_kernel(g, n, kk, w.shape[1], lanes, static_shape(g.root), yshape,
                                        "float32" if bits is None else "bfloat16")
            gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
            wc = relax.const(wq) if bits is None else relax.const(bf16_constant_array(bits), "bfloat16")
            call = relax.call_tir(gv, [rw.visit_expr(g.root), wc], relax.TensorType(yshape, "float32"))
            kname = kan.KERNEL_NAME if bits is None else kan.KERNEL_NAME_BF16W
            self.report.append({"kernel": kname, "func": name, "in": n, "basis": kk,
                                "out": int(w.shape[1]), "nodes": len(g.nodes)})
            return call, "kan"

        def fuse_int8(rw: Any, v: Any, bound: dict[Any, Any], uses: dict[Any, int]) -> tuple[Any, str] | None:
            """The int8 pass's dynamic-int8 layer over a basis (DynamicQuantizeLinear + MatMulInteger + scale
            [+ bias]) as one kernel, on a CPU whose int8 dot products multiply W exactly."""
            layer = match_dynamic_layer(v, bound, uses, [], self.cfg.int8_isa)
            if layer is None or layer.relu:
                return None
            vexpr = basis_of(rw, layer.x)
            xs = static_shape(layer.x)
            if vexpr is None or xs is None:
                return None
            found = plan(rw, vexpr, layer.w, (*xs[:-1], layer.w.shape[1]))
            if found is None:
                return None
            g, n, kk, yshape = found
            isa, out = self.cfg.int8_isa, int(layer.w.shape[1])
            wmajor = kan.basis_major(layer.w, n, kk)
            p = kan.Int8Layer(n=n, k=kk, out=out, isa=isa, block_n=kan.int8_block_n(out, isa), lanes=lanes,
                              x_shape=static_shape(g.root), y_shape=yshape, bias=layer.bias is not None)
            func = kan.fused_kan_int8_kernel(g, p)
            name = f"edgec_kan_i8_{len(self.report)}"
            gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
            consts = [pack_int8(wmajor, p.block_n, ISAS[isa].lanes), column_sums(wmajor), layer.wscale,
                      layer.bias if layer.bias is not None else np.zeros((1,), np.float32)]
            call = relax.call_tir(gv, [rw.visit_expr(g.root), *(relax.const(c) for c in consts)],
                                  relax.TensorType(yshape, "float32"))
            self.report.append({"kernel": kan.KERNEL_NAME_INT8, "func": name, "in": n, "basis": kk, "out": out,
                                "nodes": len(g.nodes), "isa": isa, "dynamic_quantization": True})
            return call, "kan"

        def rewrite_for(func: Any) -> Any:
            if not isinstance(func.body, relax.SeqExpr):
                return None
            bound, uses = bindings_and_uses(func)

            def fuse(rw: Any, binding: Any) -> tuple[Any, str] | None:
                return fuse_fp32(rw, binding.value) or fuse_int8(rw, binding.value, bound, uses)

            return fuse

        folded = relax.transform.FoldConstant()(mod)
        return rewrite_bindings(folded, rewrite_for)


__all__ = ["FuseKan", "extract_basis"]
