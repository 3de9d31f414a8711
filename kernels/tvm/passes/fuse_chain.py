"""fuse-gemv-chains: a run of packed-GEMV calls as one chain kernel (``kernels.tvm.tir.chain``).

A run of >= 2 packed-GEMV ``call_tir``s (constant weights, the same row count), each intermediate used
once, by the next layer only, whose packed weights total at most ``chain_max_kb`` KB becomes one
``call_tir`` of the chain kernel; the per-layer PrimFuncs nothing calls any more are dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels.tvm.passes._rewrite import RewritePass, bindings_and_uses, const_array, rewrite_bindings, static_shape
from kernels.tvm.tir.chain import KERNEL_NAME, ChainLayer, chain_kernel
from kernels.tvm.tir.gemv import gemv_params


class FuseGemvChains(RewritePass):
    """Replaces each run of packed-GEMV calls within ``cfg.chain_max_kb`` by one chain kernel (0: off);
    ``report``: one row per chain."""

    pass_name = "FuseGemvChains"

    def rewrite(self, mod: Any) -> Any:
        import tvm
        from tvm import relax

        max_kb = self.cfg.chain_max_kb
        if max_kb <= 0:
            return mod
        op_call_tir = tvm.ir.Op.get("relax.call_tir")

        def as_gemv(value: Any) -> tuple[Any, ChainLayer] | None:
            """(x, layer) when ``value`` is a call_tir of a packed-GEMV kernel with constant weights."""
            if not (isinstance(value, relax.Call) and value.op == op_call_tir):
                return None
            gv, args = value.args[0], value.args[1]
            func = mod.functions.get(gv) if isinstance(gv, tvm.ir.GlobalVar) else None
            if not isinstance(func, tvm.tirx.PrimFunc) or not isinstance(args, relax.Tuple) or len(args.fields) != 3:
                return None
            p = gemv_params(func)
            w, bias = const_array(args.fields[1]), const_array(args.fields[2])
            if p is None or w is None or bias is None or w.size != p.packed_size:
                return None
            return args.fields[0], ChainLayer(p, w, bias if p.bias else None)

        def rewrite_for(func: Any) -> Any:
            if not isinstance(func.body, relax.SeqExpr):
                return None
            bound, uses = bindings_and_uses(func)
            gemvs = {var: g for var, value in bound.items() if (g := as_gemv(value)) is not None}
            # nxt[v] = the gemv binding that is the only user of gemv output v
            nxt = {g[0]: v for v, g in gemvs.items() if g[0] in gemvs and uses.get(g[0], 0) == 1}
            heads: dict[Any, tuple[Any, list[ChainLayer]]] = {}
            for v in gemvs:
                if gemvs[v][0] in nxt:
                    continue  # not the start of a run
                run = [v]
                while run[-1] in nxt:
                    run.append(nxt[run[-1]])
                layers = [gemvs[r][1] for r in run]
                kb = sum(c.weight.nbytes for c in layers) / 1024
                if len(run) >= 2 and kb <= max_kb and len({c.params.m for c in layers}) == 1:
                    heads[run[-1]] = (gemvs[run[0]][0], layers)
            if not heads:
                return None
            return lambda rw, binding: self._chain(rw, binding, *heads[binding.var]) if binding.var in heads else None

        out = rewrite_bindings(mod, rewrite_for)
        return _drop_unused_gemvs(out) if self.report else out

    def _chain(self, rw: Any, binding: Any, x: Any, layers: list[ChainLayer]) -> tuple[Any, str]:
        """The call_tir of the chain kernel for ``layers`` (its PrimFunc added to the module)."""
        from tvm import relax

        xs, ys = static_shape(x), static_shape(binding.var)
        assert xs is not None and ys is not None
        func = chain_kernel([c.params for c in layers], xs, ys)
        name = f"edgec_gemv_chain_{len(self.report)}"
        gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
        w_all = np.concatenate([c.weight.reshape(-1) for c in layers])
        biases = [c.bias.reshape(-1) for c in layers if c.bias is not None]
        b_all = np.concatenate(biases) if biases else np.zeros((1,), np.float32)
        self.report.append({"kernel": KERNEL_NAME, "func": name, "layers": len(layers),
                            "shape": [layers[0].params.k] + [c.params.n for c in layers],
                            "weight_kb": round(w_all.nbytes / 1024, 1)})
        call = relax.call_tir(gv, [rw.visit_expr(x), relax.const(w_all), relax.const(b_all)],
                              relax.TensorType(ys, "float32"))
        return call, "gemv_chain"


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
            if isinstance(f, tvm.tirx.PrimFunc) and gemv_params(f) is not None and gv.name_hint not in used]
    for gv in dead:
        del mod[gv]
    return mod


__all__ = ["FuseGemvChains"]
