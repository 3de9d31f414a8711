"""bf16-weights: packed-GEMV calls whose weights are exactly bfloat16 run the bf16-weight GEMV.

The bf16 graph pass (``toolchain.passes.bf16``, weight-only form on TVM) stores each dense weight as
bfloat16 behind a Cast to float32; TVM's importer folds that Cast into a float32 constant whose every
value is a bfloat16. The fp32 kernels (``substitute-gemv``) take such a graph as it is. This pass then
finds each packed-GEMV ``call_tir`` (``kernels.tvm.tir.gemv``) whose packed weight constant is exactly
bfloat16 (all lower 16 bits zero) and replaces it with ``kernels.tvm.tir.gemv_bf16``'s kernel reading the
weights as bf16 pairs in 32-bit words: half the weight bytes, float32 accumulation, the same result up to
summation order. Runs of such layers within the profile's ``gemv_chain_max_kb`` (in bf16 bytes) become
one bf16 chain kernel, as ``fuse-gemv-chains`` does for fp32 (this pass runs just before it).

Lossless by construction, so it needs no flag: a float32 model whose weights happen to be bf16-exact gets
it too. The fused KAN and fused LIF-layer kernels do the same for their weights where they are put in
(``fuse-kan``, ``fuse-lif``: ``kan-fused-bf16w``, ``lif-layer-bf16w``); the grouped GEMV and the convolution
kernels keep float32 weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kernels.tvm.passes._rewrite import RewritePass, bindings_and_uses, const_array, rewrite_bindings, static_shape
from kernels.tvm.tir.bf16 import to_bf16_bits
from kernels.tvm.tir.gemv import GemvParams, gemv_params
from kernels.tvm.tir.gemv_bf16 import CHAIN_KERNEL_NAME, KERNEL_NAME, chain_bf16_kernel, gemv_bf16_kernel, pack_pairs


class StoreWeightsBf16(RewritePass):
    """Replaces each packed-GEMV call with bf16-exact weights by the bf16-weight GEMV, and runs of them
    (each intermediate used once, by the next layer only; bf16 weights within ``cfg.chain_max_kb``) by one
    bf16 chain kernel, as ``fuse-gemv-chains`` does for fp32; ``report``: one row per kernel put in."""

    pass_name = "StoreWeightsBf16"

    def rewrite(self, mod: Any) -> Any:
        import tvm
        from tvm import relax

        op_call_tir = tvm.ir.Op.get("relax.call_tir")

        def as_bf16_gemv(var: Any, value: Any) -> Bf16Layer | None:
            if not (isinstance(value, relax.Call) and value.op == op_call_tir):
                return None
            gv, args = value.args[0], value.args[1]
            prim = mod.functions.get(gv) if isinstance(gv, tvm.ir.GlobalVar) else None
            if not isinstance(prim, tvm.tirx.PrimFunc) or not isinstance(args, relax.Tuple) or len(args.fields) != 3:
                return None
            p = gemv_params(prim)
            w, bias = const_array(args.fields[1]), const_array(args.fields[2])
            if p is None or w is None or bias is None or w.size != p.packed_size:
                return None
            bits = to_bf16_bits(w)
            xs, ys = static_shape(args.fields[0]), static_shape(var)
            if bits is None or xs is None or ys is None:
                return None
            return Bf16Layer(args.fields[0], dataclasses.replace(p, x_shape=xs, y_shape=ys), bits, bias,
                             gv.name_hint, w.nbytes)

        def rewrite_for(func: Any) -> Any:
            if not isinstance(func.body, relax.SeqExpr):
                return None
            bound, uses = bindings_and_uses(func)
            layers = {var: g for var, value in bound.items() if (g := as_bf16_gemv(var, value)) is not None}
            if not layers:
                return None
            # nxt[v] = the layer that is the only user of layer output v (fuse_chain's rule)
            nxt = {g.x: v for v, g in layers.items() if g.x in layers and uses.get(g.x, 0) == 1}
            plan: dict[Any, list[Bf16Layer]] = {}
            for v in layers:
                if layers[v].x in nxt:
                    continue  # not the start of a run
                run = [v]
                while run[-1] in nxt:
                    run.append(nxt[run[-1]])
                kb = sum(layers[r].bits.nbytes for r in run) / 1024
                if len(run) >= 2 and kb <= self.cfg.chain_max_kb and len({layers[r].params.m for r in run}) == 1:
                    plan[run[-1]] = [layers[r] for r in run]
                else:
                    plan.update({r: [layers[r]] for r in run})
            return lambda rw, binding: self._replace(rw, binding, plan[binding.var]) if binding.var in plan else None

        out = rewrite_bindings(mod, rewrite_for)
        return _drop_uncalled(out, {n for r in self.report for n in r["replaces"]}) if self.report else out

    def _replace(self, rw: Any, binding: Any, run: list[Bf16Layer]) -> tuple[Any, str]:
        """The call_tir of the bf16 GEMV (one layer) or bf16 chain (several) for ``run``."""
        from tvm import relax

        ys = static_shape(binding.var)
        assert ys is not None
        index = len(self.report)
        if len(run) == 1:
            g = run[0]
            kernel, kname, name = gemv_bf16_kernel(g.params), KERNEL_NAME, f"edgec_gemv_bf16w_{index}"
            bias = g.bias
        else:
            kernel = chain_bf16_kernel([g.params for g in run], run[0].params.x_shape, ys)
            kname, name = CHAIN_KERNEL_NAME, f"edgec_gemv_chain_bf16w_{index}"
            biases = [g.bias.reshape(-1) for g in run if g.params.bias]
            bias = np.concatenate(biases) if biases else np.zeros((1,), np.float32)
        words = np.concatenate([pack_pairs(g.bits, g.params) for g in run])
        gv = rw.builder_.add_func(kernel.with_attr("global_symbol", name), name)
        self.report.append({"kernel": kname, "func": name, "replaces": [g.func for g in run],
                            "shape": [run[0].params.k] + [g.params.n for g in run], "m": run[0].params.m,
                            "weight_bytes": int(words.nbytes), "weight_bytes_fp32": sum(g.fp32_bytes for g in run)})
        args = [rw.visit_expr(run[0].x), relax.const(words), relax.const(bias)]
        return relax.call_tir(gv, args, relax.TensorType(ys, "float32")), "gemv_bf16w"


@dataclasses.dataclass(frozen=True)
class Bf16Layer:
    """A packed-GEMV call whose weights are exactly bf16."""

    x: Any  # its input expression
    params: GemvParams  # with the graph's x / y shapes
    bits: np.ndarray  # the packed weight as bf16 bits (uint16)
    bias: np.ndarray  # the bias constant (a 1-element dummy without bias)
    func: str  # the fp32 PrimFunc it replaces
    fp32_bytes: int


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
