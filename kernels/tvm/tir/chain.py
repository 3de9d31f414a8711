"""One kernel for a whole chain of small dense layers (a tiny MLP), instead of one kernel per layer.

A ~5 us MLP spends a quarter of its time outside its kernels: per layer the Relax VM runs four
instructions (allocate storage, allocate the tensor, free, call the kernel), each a packed-function
call. ``fuse_gemv_chains`` rewrites a run of packed-GEMV ``call_tir``s in which every intermediate is
used once, by the next layer only, into one ``call_tir`` of ``chain_kernel``: the layers' loop nests
(the same TVMScript macro ``kernels.tvm.gemv`` uses, so the code per layer is identical) one after
another in a single PrimFunc, the intermediates in two ping-pong scratch buffers on the stack, all
packed weights in one constant and all biases in another.

Only chains whose packed weights total at most the profile's ``gemv_chain_max_kb`` are fused: past a
few hundred KB a model is bound by weight streaming and the saved dispatch is noise (0 turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm.gemv import KERNEL_NAME as GEMV_NAME
from kernels.tvm.gemv import GemvParams, layer_macro
from kernels.tvm.substitute import _const_array, _static_shape

KERNEL_NAME = "gemv-chain-f32"
MAX_CHAIN = 8  # layers one chain kernel takes (the PrimFunc below spells out each position)


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a chain: its parameters and its packed weight / bias constants."""

    params: GemvParams
    weight: np.ndarray  # packed (kernels.tvm.gemv.pack_weight)
    bias: np.ndarray | None


def chain_kernel(layers: list[GemvParams], x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> Any:
    """The PrimFunc ``(x, w_all, b_all, y)`` running ``layers`` in order; w_all / b_all are the layers'
    packed weights / biases concatenated (layers without bias take no bias space)."""
    from tvm.script import tirx as T

    nl = len(layers)
    if not 1 <= nl <= MAX_CHAIN:
        raise ValueError(f"a chain has 1..{MAX_CHAIN} layers, got {nl}")
    M = layers[0].m
    woffs = np.cumsum([0] + [p.packed_size for p in layers]).tolist()
    boffs = np.cumsum([0] + [p.n if p.bias else 0 for p in layers]).tolist()
    WSIZE, BSIZE = max(1, woffs[-1]), max(1, boffs[-1])
    HW = max([p.n for p in layers[:-1]] + [1])  # widest intermediate
    XS, YS = x_shape, y_shape
    K0, NL_ = layers[0].k, layers[-1].n
    # Per position: which buffer a layer reads and writes (0 = x, 1 / 2 = scratch A / B, 3 = y).
    IN = [0] + [1 + (j - 1) % 2 for j in range(1, nl)] + [0] * (MAX_CHAIN - nl)
    OUT = [1 + j % 2 for j in range(nl - 1)] + [3] + [3] * (MAX_CHAIN - nl)
    L = [layer_macro(p) for p in layers] + [None] * (MAX_CHAIN - nl)
    WO, BO = woffs + [0] * MAX_CHAIN, boffs + [0] * MAX_CHAIN
    NL = nl

    @T.prim_func
    def chain(
        xg: T.Buffer(XS, "float32"),
        wp: T.Buffer((WSIZE,), "float32"),
        b: T.Buffer((BSIZE,), "float32"),
        yg: T.Buffer(YS, "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "edgec.kernel": KERNEL_NAME, "tirx.is_scheduled": True})
        x = T.decl_buffer((M, K0), "float32", data=xg.data)
        y = T.decl_buffer((M, NL_), "float32", data=yg.data)
        ha = T.alloc_buffer((M, HW), "float32", scope="local")
        hb = T.alloc_buffer((M, HW), "float32", scope="local")
        bufs = (x, ha, hb, y)
        # TVMScript evaluates these Python conditions while parsing: only the first NL positions emit code.
        if NL > 0:
            L[0](bufs[IN[0]], wp, WO[0], b, BO[0], bufs[OUT[0]])
        if NL > 1:
            L[1](bufs[IN[1]], wp, WO[1], b, BO[1], bufs[OUT[1]])
        if NL > 2:
            L[2](bufs[IN[2]], wp, WO[2], b, BO[2], bufs[OUT[2]])
        if NL > 3:
            L[3](bufs[IN[3]], wp, WO[3], b, BO[3], bufs[OUT[3]])
        if NL > 4:
            L[4](bufs[IN[4]], wp, WO[4], b, BO[4], bufs[OUT[4]])
        if NL > 5:
            L[5](bufs[IN[5]], wp, WO[5], b, BO[5], bufs[OUT[5]])
        if NL > 6:
            L[6](bufs[IN[6]], wp, WO[6], b, BO[6], bufs[OUT[6]])
        if NL > 7:
            L[7](bufs[IN[7]], wp, WO[7], b, BO[7], bufs[OUT[7]])

    return chain


def _gemv_params(func: Any) -> GemvParams | None:
    attrs = func.attrs or {}
    if str(attrs.get("edgec.kernel", "")) != GEMV_NAME or "edgec.gemv" not in attrs:
        return None
    a = attrs["edgec.gemv"]
    if str(a["dtype"]) != "float32":
        return None
    return GemvParams(m=int(a["m"]), k=int(a["k"]), n=int(a["n"]), block_n=int(a["block_n"]),
                      unroll=int(a["unroll"]), bias=bool(a["bias"]), relu=bool(a["relu"]))


def fuse_gemv_chains(mod: Any, max_kb: int) -> tuple[Any, list[dict[str, Any]]]:
    """Replace each run of >= 2 packed-GEMV calls (each intermediate used once, by the next layer) whose
    packed weights total <= ``max_kb`` KB by one chain kernel. Returns (module, one row per chain)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator


    report: list[dict[str, Any]] = []
    if max_kb <= 0:
        return mod, report
    op_call_tir = tvm.ir.Op.get("relax.call_tir")

    def as_gemv(value: Any) -> tuple[Any, ChainLayer] | None:
        """(x, layer) when ``value`` is a call_tir of a packed-GEMV kernel with constant weights."""
        if not (isinstance(value, relax.Call) and value.op == op_call_tir):
            return None
        gv, args = value.args[0], value.args[1]
        func = mod.functions.get(gv) if isinstance(gv, tvm.ir.GlobalVar) else None
        if not isinstance(func, tvm.tirx.PrimFunc) or not isinstance(args, relax.Tuple) or len(args.fields) != 3:
            return None
        p = _gemv_params(func)
        w, bias = _const_array(args.fields[1]), _const_array(args.fields[2])
        if p is None or w is None or bias is None or w.size != p.packed_size:
            return None
        return args.fields[0], ChainLayer(p, w, bias if p.bias else None)

    @mutator
    class _Chain(PyExprMutator):
        def __init__(self, m: Any) -> None:
            super().__init__(m)
            self.heads: dict[Any, tuple[Any, list[ChainLayer]]] = {}

        def visit_var_binding_(self, binding: Any) -> None:
            plan = self.heads.get(binding.var)
            if plan is None:
                super().visit_var_binding_(binding)
                return
            x, layers = plan
            xs, ys = _static_shape(x), _static_shape(binding.var)
            assert xs is not None and ys is not None
            func = chain_kernel([c.params for c in layers], xs, ys)
            name = f"edgec_gemv_chain_{len(report)}"
            gv = self.builder_.add_func(func.with_attr("global_symbol", name), name)
            w_all = np.concatenate([c.weight.reshape(-1) for c in layers])
            biases = [c.bias.reshape(-1) for c in layers if c.bias is not None]
            b_all = np.concatenate(biases) if biases else np.zeros((1,), np.float32)
            call = relax.call_tir(gv, [self.visit_expr(x), relax.const(w_all), relax.const(b_all)],
                                  relax.TensorType(ys, "float32"))
            self.set_var_remap(binding.var, self.builder_.emit(call, "gemv_chain"))
            report.append({"kernel": KERNEL_NAME, "func": name, "layers": len(layers),
                           "shape": [layers[0].params.k] + [c.params.n for c in layers],
                           "weight_kb": round(w_all.nbytes / 1024, 1)})

    rw = _Chain(mod)
    for gvar, func in list(mod.functions.items()):
        if not (isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr)):
            continue
        gemvs: dict[Any, tuple[Any, ChainLayer]] = {}
        uses: dict[Any, int] = {}
        count = _counter(uses)
        for blk in func.body.blocks:
            for bnd in blk.bindings:
                if isinstance(bnd, relax.VarBinding):
                    relax.analysis.post_order_visit(bnd.value, count)
                    g = as_gemv(bnd.value)
                    if g is not None:
                        gemvs[bnd.var] = g
        relax.analysis.post_order_visit(func.body.body, count)
        # next[v] = the gemv binding that is the only user of gemv output v
        nxt = {g[0]: v for v, g in gemvs.items() if g[0] in gemvs and uses.get(g[0], 0) == 1}
        starts = [v for v in gemvs if gemvs[v][0] not in nxt]
        rw.heads = {}
        for v in starts:
            run = [v]
            while run[-1] in nxt and len(run) < MAX_CHAIN:
                run.append(nxt[run[-1]])
            layers = [gemvs[r][1] for r in run]
            kb = sum(c.weight.nbytes for c in layers) / 1024
            if len(run) >= 2 and kb <= max_kb and len({c.params.m for c in layers}) == 1:
                rw.heads[run[-1]] = (gemvs[run[0]][0], layers)
        if rw.heads:
            rw.builder_.update_func(gvar, rw.visit_expr(func))
    out = relax.transform.DeadCodeElimination()(rw.builder_.get())
    return (_drop_unused_gemvs(out) if report else out), report


def _counter(uses: dict[Any, int]) -> Any:
    """A post_order_visit callback counting each Relax variable's uses into ``uses``."""
    from tvm import relax

    def count(e: Any) -> None:
        if isinstance(e, relax.Var):
            uses[e] = uses.get(e, 0) + 1

    return count


def _drop_unused_gemvs(mod: Any) -> Any:
    """Remove per-layer GEMV PrimFuncs no Relax function calls any more (fused into a chain): they
    would still be compiled into the library and listed as kernels."""
    import tvm
    from tvm import relax

    used: set[str] = set()

    def visit(e: Any) -> None:
        if isinstance(e, tvm.ir.GlobalVar):
            used.add(e.name_hint)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    dead = [gv for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and _gemv_params(f) is not None and gv.name_hint not in used]
    for gv in dead:
        del mod[gv]
    return mod


__all__ = ["KERNEL_NAME", "MAX_CHAIN", "chain_kernel", "fuse_gemv_chains"]
