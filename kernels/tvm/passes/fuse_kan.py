"""fuse-kan: a KAN layer's basis expansion + contraction as one fused kernel (``kernels.tvm.tir.kan``).

Matches ``matmul(reshape(B(z)), W)`` with W a constant (n*K, out): ``extract_basis`` reads the per-feature
graph B off the Relax IR (elementwise ops, comparisons, slices and concats along the basis axis,
constants shared by all features), with no knowledge of which basis it is.

After the int8 pass (dynamic) the contraction is ``DynamicQuantizeLinear`` + ``MatMulInteger`` + a scale
(substitute_gemv's ``match_dynamic_layer``) over the same reshaped basis: that layer becomes the int8 fused
kernel (``kan.fused_kan_int8_kernel``: basis fp32 in L1, quantized per call as the graph says, int8 weights
per output column on the CPU's int8 dot products) where the profile has them and they multiply W exactly.
The int8 kernel takes in what surrounds the contraction in the zoo's KAN layers (``int8_plans``): a LayerNorm of
the layer input feeding only the bases, the dynamic-int8 SiLU base branch over the same input and the add
(FastKAN / efficient-kan: the whole layer is one call), and S-KAN's several bases over constant gathers of the
normalized input, concatenated into one contraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

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
from kernels.tvm.tir import kan
from kernels.tvm.tir._elementwise import BINARY, CONCAT, CONST, INPUT, SLICE, UNARY, Node
from kernels.tvm.tir.bf16 import bf16_constant_array, to_bf16_bits
from kernels.tvm.tir.int8_dot import ISAS, column_sums, pack_int8

# The Relax elementwise ops a basis graph may use (all in the shared op table; ``power`` only as a square).
UNARY_OPS = ("exp", "tanh", "sigmoid", "negative", "sqrt", "square")
BINARY_OPS = ("add", "subtract", "multiply", "divide", "greater_equal", "greater", "less", "less_equal",
              "logical_and", "logical_or", "maximum", "minimum", "power")


def extract_basis(v_expr: Any, lookup: Any, elementwise: bool = False) -> kan.BasisGraph:
    """Per-feature graph producing ``v_expr`` (shape (..., n, K)), ``lookup(var)`` giving a variable's bound
    value; raises NoMatch. ``elementwise``: ``v_expr`` has the input's own shape (..., n), one value per
    feature (a base branch's SiLU)."""
    import tvm
    from tvm import relax

    vshape = require_shape(v_expr)
    root_shape = vshape if elementwise else vshape[:-1]
    rank = len(root_shape) + 1
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


@dataclass(frozen=True)
class Int8Plan:
    """One dynamic-int8 KAN layer to emit as ``kan.fused_kan_int8_kernel``: its input, the basis graph, the
    contraction's int8 weight (basis-major rows), and the optional LayerNorm and base branch."""

    x: Any  # the Relax var the kernel reads
    params: kan.Int8Layer
    spline: DynamicLayer
    norm: tuple[np.ndarray, np.ndarray] | None = None  # gamma, beta
    base: DynamicLayer | None = None
    gathers: tuple[np.ndarray, ...] = ()  # int32 feature indices of the gathered segments, in order


class SegmentMatch(NamedTuple):
    """One basis feeding a contraction: ``reshape(B(z[idx] or z))``."""

    graph: kan.BasisGraph
    n: int  # features it expands
    k: int  # basis functions per feature
    z: Any  # the tensor its features come from
    idx: np.ndarray | None  # int32 gather indices into z's features, None for all of them in order


@dataclass(frozen=True)
class SplineMatch:
    """A dynamic-int8 contraction over the concatenated bases of one tensor z (one basis, or S-KAN's several
    over constant gathers of z)."""

    layer: DynamicLayer
    segments: list[SegmentMatch]
    z: Any
    n: int  # features of z
    yshape: tuple[int, ...]


def int8_plans(bound: dict[Any, Any], uses: dict[Any, int], isa: str, lanes: int) -> dict[Any, Int8Plan]:
    """var -> the int8 KAN layer ending at its binding, for every dynamic-int8 contraction over a basis in one
    function (``bound`` / ``uses`` from ``bindings_and_uses``). Where the layer's output is only added to a
    dynamic-int8 base branch over the same input (``add(spline, base)``), the plan is the whole layer, at the
    add; a LayerNorm of that input feeding only the basis is taken in too."""
    import tvm
    from tvm import relax

    if isa not in ISAS:
        return {}
    op_reshape, op_add = tvm.ir.Op.get("relax.reshape"), tvm.ir.Op.get("relax.add")
    op_norm = tvm.ir.Op.get("relax.nn.layer_norm")
    op_take, op_concat = tvm.ir.Op.get("relax.take"), tvm.ir.Op.get("relax.concat")

    def lookup(e: Any) -> Any:
        return bound.get(e) if isinstance(e, relax.Var) else None

    def segment_of(e: Any) -> SegmentMatch | None:
        rs = lookup(e)
        if not (isinstance(rs, relax.Call) and rs.op == op_reshape):
            return None
        vs = static_shape(rs.args[0])
        if vs is None or len(vs) < 2 or int(np.prod(vs[:-2])) != 1 or vs[-1] < 2:
            return None
        try:
            g = extract_basis(rs.args[0], lookup)
        except NoMatch:
            return None
        z, idx = g.root, None
        tk = lookup(g.root)
        if isinstance(tk, relax.Call) and tk.op == op_take and uses.get(g.root, 0) == 1:
            ix = const_array(tk.args[1])
            zs = static_shape(tk.args[0])
            rank = len(zs or ())
            if ix is not None and ix.ndim == 1 and zs is not None and int(tk.attrs.axis) in (rank - 1, -1) \
                    and int(np.prod(zs)) == zs[-1] and ix.size and 0 <= int(ix.min()) <= int(ix.max()) < zs[-1]:
                z, idx = tk.args[0], ix.astype(np.int32)
        root_shape = static_shape(g.root)
        if root_shape is None or int(np.prod(root_shape)) != vs[-2]:
            return None
        return SegmentMatch(g, vs[-2], vs[-1], z, idx)

    def spline_of(value: Any) -> SplineMatch | None:
        layer = match_dynamic_layer(value, bound, uses, [], isa)
        if layer is None or layer.relu:
            return None
        xs = static_shape(layer.x)
        if xs is None or int(np.prod(xs[:-1])) != 1 or int(layer.w.shape[1]) > kan.MAX_OUT:
            return None
        cat = lookup(layer.x)
        parts = list(cat.args[0].fields) if isinstance(cat, relax.Call) and cat.op == op_concat and \
            int(cat.attrs.axis) in (len(xs) - 1, -1) else [layer.x]
        found = [segment_of(e) for e in parts]
        segs = [sg for sg in found if sg is not None]
        if len(segs) != len(parts) or (len(parts) > 1 and any(uses.get(e, 0) != 1 for e in parts)):
            return None
        z = segs[0].z
        if any(not sg.z.same_as(z) for sg in segs) or static_shape(z) is None:
            return None
        n = int(np.prod(static_shape(z)))
        if sum(sg.n * sg.k for sg in segs) != layer.w.shape[0] or any(sg.idx is None and sg.n != n for sg in segs):
            return None
        return SplineMatch(layer, segs, z, n, (*xs[:-1], int(layer.w.shape[1])))

    def layer_norm_of(sp: SplineMatch, x: Any | None) -> tuple[Any, np.ndarray, np.ndarray, float] | None:
        """(its input, gamma, beta, eps) when the basis input ``sp.z`` is a LayerNorm over the last axis of a
        tensor (``x`` where given) with constant gamma and beta, used by the layer's bases only."""
        root, n = sp.z, sp.n
        ln = lookup(root)
        if not (isinstance(ln, relax.Call) and ln.op == op_norm) or uses.get(root, 0) != len(sp.segments):
            return None
        src = ln.args[0]
        rank = len(static_shape(src) or ())
        axes = [int(a) for a in ln.attrs.axes]
        gamma, beta = const_array(ln.args[1]), const_array(ln.args[2])
        if (x is not None and not src.same_as(x)) or axes not in ([-1], [rank - 1]) or gamma is None \
                or beta is None or gamma.size != n or beta.size != n or not (ln.attrs.center and ln.attrs.scale):
            return None
        return src, gamma.reshape(n).astype(np.float32), beta.reshape(n).astype(np.float32), float(ln.attrs.epsilon)

    def make(x: Any, sp: SplineMatch, norm: Any, base: DynamicLayer | None, base_graph: Any) -> Int8Plan:
        layer = sp.layer
        out = int(layer.w.shape[1])
        branch = kan.BaseBranch(base_graph, out, base.bias is not None) if base is not None else None
        segs = tuple(kan.Segment(sg.graph, sg.n, sg.k, sg.idx is not None) for sg in sp.segments)
        p = kan.Int8Layer(n=sp.n, segments=segs, out=out, isa=isa, block_n=kan.int8_block_n(out, isa),
                          lanes=lanes, x_shape=static_shape(x), y_shape=sp.yshape, bias=layer.bias is not None,
                          norm_eps=norm[3] if norm is not None else None, base=branch)
        gathers = tuple(sg.idx for sg in sp.segments if sg.idx is not None)
        return Int8Plan(x, p, layer, (norm[1], norm[2]) if norm is not None else None, base, gathers)

    plans: dict[Any, Int8Plan] = {}
    covered: set[Any] = set()
    for var, value in bound.items():
        if not (isinstance(value, relax.Call) and value.op == op_add):
            continue
        for a, b in (value.args, tuple(reversed(value.args))):
            found = spline_of(lookup(a)) if uses.get(a, 0) == 1 else None
            base = match_dynamic_layer(lookup(b), bound, uses, [], isa) if found and uses.get(b, 0) == 1 else None
            if found is None or base is None or base.relu or base.w.shape != (found.n, found.layer.w.shape[1]):
                continue
            try:
                bg = extract_basis(base.x, lookup, elementwise=True)
            except NoMatch:
                continue
            norm = None if found.z.same_as(bg.root) else layer_norm_of(found, bg.root)
            if norm is None and not found.z.same_as(bg.root):
                continue
            plans[var] = make(bg.root, found, norm, base, bg)
            covered.add(a)
            break
    for var, value in bound.items():
        if var in plans or var in covered:
            continue
        found = spline_of(value)
        if found is not None:
            norm = layer_norm_of(found, None)
            plans[var] = make(norm[0] if norm is not None else found.z, found, norm, None, None)
    return plans


def int8_chains(plans: dict[Any, Int8Plan], bound: dict[Any, Any], uses: dict[Any, int]) -> dict[Any, Any]:
    """var -> the var of the int8 KAN layer before it, for each layer (``int8_plans``) whose input is another
    layer's output that nothing else reads (every use of it lies in the bindings the later layer replaces): the two
    run as one kernel call (``kan.fused_kan_int8_kernel``'s ``then``)."""
    from tvm import relax

    def uses_within(var: Any, src: Any) -> int:
        """Uses of ``src`` in the bindings ``var`` is computed from (not looking past ``src``)."""
        seen: set[Any] = set()
        count = 0
        todo = [var]
        while todo:
            v = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            stack = [bound.get(v)]
            while stack:
                e = stack.pop()
                if isinstance(e, relax.Var):
                    if e.same_as(src):
                        count += 1
                    elif e in bound:
                        todo.append(e)
                elif isinstance(e, relax.Call):
                    stack.extend(e.args)
                elif isinstance(e, relax.Tuple):
                    stack.extend(e.fields)
                elif isinstance(e, relax.TupleGetItem):
                    stack.append(e.tuple_value)
        return count

    prev: dict[Any, Any] = {}
    for var, plan in plans.items():
        src = plan.x
        if (isinstance(src, relax.Var) and src in plans and src not in prev.values()
                and plans[src].params.out == plan.params.n and uses_within(var, src) == uses.get(src, 0)):
            prev[var] = src
    return prev


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

        def rewrite_for(func: Any) -> Any:
            if not isinstance(func.body, relax.SeqExpr):
                return None
            bound, uses = bindings_and_uses(func)
            plans = int8_plans(bound, uses, self.cfg.int8_isa, lanes)
            prev = int8_chains(plans, bound, uses)

            def chain(var: Any) -> list[Int8Plan]:
                return [*(chain(prev[var]) if var in prev else []), plans[var]]

            def fuse(rw: Any, binding: Any) -> tuple[Any, str] | None:
                if binding.var in prev.values():
                    return None  # computed inside the next layer's kernel; its own bindings are dead afterwards
                if binding.var in plans:
                    return self._emit_int8(rw, chain(binding.var))
                return fuse_fp32(rw, binding.value)

            return fuse

        folded = relax.transform.FoldConstant()(mod)
        return rewrite_bindings(folded, rewrite_for)


    def _emit_int8(self, rw: Any, plans: list[Int8Plan]) -> tuple[Any, str]:
        """The call_tir of the int8 fused kernel for a chain of ``plans`` (each the next one's input; usually
        one), its PrimFunc added to the module."""
        from tvm import relax

        layers = [plan.params for plan in plans]
        func = kan.fused_kan_int8_kernel(layers[0], tuple(layers[1:]))
        name = f"edgec_kan_i8_{len(self.report)}"
        gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
        zeros = np.zeros((1,), np.float32)
        consts: list[np.ndarray] = []
        for plan, p in zip(plans, layers, strict=True):
            isa_lanes = ISAS[p.isa].lanes
            wmajor = kan.int8_weight_rows(p, plan.spline.w)
            consts += [*(plan.norm or ()), *plan.gathers, pack_int8(wmajor, p.block_n, isa_lanes),
                       column_sums(wmajor), plan.spline.wscale,
                       plan.spline.bias if plan.spline.bias is not None else zeros]
            if plan.base is not None:
                base = plan.base
                consts += [pack_int8(base.w, p.block_n, isa_lanes), column_sums(base.w), base.wscale,
                           base.bias if base.bias is not None else zeros]
        call = relax.call_tir(gv, [rw.visit_expr(plans[0].x), *(relax.const(c) for c in consts)],
                              relax.TensorType(layers[-1].y_shape, "float32"))
        p, plan = layers[0], plans[0]
        self.report.append({"kernel": kan.KERNEL_NAME_INT8, "func": name, "in": p.n,
                            "basis": "+".join(str(sg.k) for sg in p.segments), "out": layers[-1].out,
                            "nodes": sum(len(sg.graph.nodes) for sg in p.segments), "segments": len(p.segments),
                            "isa": p.isa, "dynamic_quantization": True, "layers": len(plans),
                            "streamed": [kan.streamed_basis(q) is not None for q in layers],
                            "layer_norm": plan.norm is not None, "base_branch": plan.base is not None})
        return call, "kan"


__all__ = ["FuseKan", "extract_basis"]
