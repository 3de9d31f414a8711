"""bf16-weights: packed-GEMV calls whose weights are exactly bfloat16 run the bf16-weight GEMV.

The bf16 graph pass (``toolchain.passes.bf16``, weight-only form on TVM) stores each dense weight as
bfloat16 behind a Cast to float32; TVM's importer folds that Cast into a float32 constant whose every
value is a bfloat16. The fp32 kernels (``substitute-gemv``) take such a graph as it is. This pass then
finds each packed-GEMV ``call_tir`` (``kernels.tvm.tir.gemv``) whose packed weight constant is exactly
bfloat16 (all lower 16 bits zero) and replaces it with ``kernels.tvm.tir.gemv_bf16``'s kernel reading the
weights as bf16 pairs in 32-bit words: half the weight bytes, float32 accumulation, the same result up to
summation order. ``fuse-gemv-chains`` (run just after) then chains runs of these layers like the fp32 ones.

Lossless by construction, so it needs no flag: a float32 model whose weights happen to be bf16-exact gets
it too. The fused KAN and fused LIF-layer kernels do the same for their weights where they are put in
(``fuse-kan``, ``fuse-lif``: ``kan-fused-bf16w``, ``lif-layer-bf16w``); the grouped GEMV and the convolution
kernels keep float32 weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kernels.tvm.passes._rewrite import RewritePass, const_array, drop_uncalled, rewrite_calls, static_shape
from kernels.tvm.tir.bf16 import to_bf16_bits
from kernels.tvm.tir.gemv import gemv_params
from kernels.tvm.tir.gemv_bf16 import KERNEL_NAME, gemv_bf16_kernel, pack_pairs


class StoreWeightsBf16(RewritePass):
    """Replaces each packed-GEMV call with bf16-exact weights by the bf16-weight GEMV; ``report``: one row per
    kernel put in."""

    pass_name = "StoreWeightsBf16"

    def rewrite(self, mod: Any) -> Any:
        import tvm
        from tvm import relax

        op_call_tir = tvm.ir.Op.get("relax.call_tir")

        def replace(rw: Any, call: Any) -> Any:
            if not (isinstance(call, relax.Call) and call.op == op_call_tir):
                return call
            gv, args = call.args[0], call.args[1]
            prim = mod.functions.get(gv) if isinstance(gv, tvm.ir.GlobalVar) else None
            if not isinstance(prim, tvm.tirx.PrimFunc) or not isinstance(args, relax.Tuple) or len(args.fields) != 3:
                return call
            p = gemv_params(prim)
            w, bias = const_array(args.fields[1]), const_array(args.fields[2])
            if p is None or w is None or bias is None or w.size != p.packed_size:
                return call
            bits = to_bf16_bits(w)
            xs, ys = static_shape(args.fields[0]), static_shape(call)
            if bits is None or xs is None or ys is None:
                return call
            p = dataclasses.replace(p, x_shape=xs, y_shape=ys)
            words = pack_pairs(bits, p)
            name = f"edgec_gemv_bf16w_{len(self.report)}"
            new = rw.builder_.add_func(gemv_bf16_kernel(p).with_attr("global_symbol", name), name)
            self.report.append({"kernel": KERNEL_NAME, "func": name, "replaces": [gv.name_hint],
                                "shape": [p.k, p.n], "m": p.m, "weight_bytes": int(words.nbytes),
                                "weight_bytes_fp32": int(w.nbytes)})
            return relax.call_tir(new, [args.fields[0], relax.const(words), relax.const(bias)],
                                  relax.TensorType(ys, "float32"))

        out = rewrite_calls(mod, replace)
        return drop_uncalled(out, {n for r in self.report for n in r["replaces"]}) if self.report else out


__all__ = ["StoreWeightsBf16"]
