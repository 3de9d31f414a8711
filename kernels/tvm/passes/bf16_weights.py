"""bf16-weights: packed-GEMV calls whose weights are exactly bfloat16 run the bf16-weight GEMV.

The bf16 graph pass (``toolchain.passes.bf16``, weight-only form on TVM) stores each dense weight as
bfloat16 behind a Cast to float32; TVM's importer folds that Cast into a float32 constant whose every
value is a bfloat16. The fp32 kernels (``substitute-gemv``) take such a graph as it is. This pass then
finds each packed-GEMV ``call_tir`` (``kernels.tvm.tir.gemv``) whose packed weight constant is exactly
bfloat16 (all lower 16 bits zero) and replaces it with ``kernels.tvm.tir.gemv_bf16``'s kernel reading the
same layout from a bfloat16 constant: half the weight bytes, float32 accumulation, the same result up to
summation order. Lossless by construction, so it needs no flag: a float32 model whose weights happen to be
bf16-exact gets it too. Other kernels (chains, grouped, fused KAN / LIF, convolutions) keep float32 weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kernels.tvm.passes._rewrite import RewritePass, const_array, rewrite_bindings, static_shape
from kernels.tvm.tir.gemv import gemv_params
from kernels.tvm.tir.gemv_bf16 import KERNEL_NAME, bf16_constant_array, gemv_bf16_kernel, to_bf16_bits


class StoreWeightsBf16(RewritePass):
    """Replaces each packed-GEMV call with bf16-exact weights by the bf16-weight GEMV; ``report``: one row
    per layer."""

    pass_name = "StoreWeightsBf16"

    def rewrite(self, mod: Any) -> Any:
        import tvm
        from tvm import relax

        op_call_tir = tvm.ir.Op.get("relax.call_tir")

        def rewrite_for(func: Any) -> Any:
            if not isinstance(func.body, relax.SeqExpr):
                return None

            def rewrite(rw: Any, binding: Any) -> tuple[Any, str] | None:
                value = binding.value
                if not (isinstance(value, relax.Call) and value.op == op_call_tir):
                    return None
                gv, args = value.args[0], value.args[1]
                prim = mod.functions.get(gv) if isinstance(gv, tvm.ir.GlobalVar) else None
                if not isinstance(prim, tvm.tirx.PrimFunc) or not isinstance(args, relax.Tuple) \
                        or len(args.fields) != 3:
                    return None
                p = gemv_params(prim)
                w = const_array(args.fields[1])
                if p is None or w is None or w.size != p.packed_size:
                    return None
                bits = to_bf16_bits(w)
                xs, ys = static_shape(args.fields[0]), static_shape(binding.var)
                if bits is None or xs is None or ys is None:
                    return None
                kernel = gemv_bf16_kernel(dataclasses.replace(p, x_shape=xs, y_shape=ys))
                name = f"edgec_gemv_bf16w_{len(self.report)}"
                new_gv = rw.builder_.add_func(kernel.with_attr("global_symbol", name), name)
                self.report.append({"kernel": KERNEL_NAME, "func": name, "replaces": gv.name_hint, "m": p.m,
                                    "k": p.k, "n": p.n, "weight_bytes": int(bits.nbytes),
                                    "weight_bytes_fp32": int(w.nbytes)})
                wconst = relax.const(bf16_constant_array(bits), "bfloat16")
                call = relax.call_tir(new_gv, [rw.visit_expr(args.fields[0]), wconst, rw.visit_expr(args.fields[2])],
                                      relax.TensorType(ys, "float32"))
                return call, "gemv_bf16w"

            return rewrite

        out = rewrite_bindings(mod, rewrite_for)
        return _drop_uncalled(out, {r["replaces"] for r in self.report}) if self.report else out


def _drop_uncalled(mod: Any, names: set[str]) -> Any:
    """``mod`` without the PrimFuncs in ``names`` that no Relax function calls any more."""
    import tvm
    from tvm import relax

    used: set[str] = set()

    def visit(e: Any) -> None:
        if isinstance(e, tvm.ir.GlobalVar):
            used.add(e.name_hint)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    for gv in [gv for gv in mod.functions if gv.name_hint in names and gv.name_hint not in used]:
        del mod[gv]
    return mod


__all__ = ["StoreWeightsBf16"]
