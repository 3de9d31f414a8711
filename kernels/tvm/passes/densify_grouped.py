"""densify-grouped: the ``modular`` pass's grouped form back to one dense layer, for the GEMV matcher.

The ``modular`` pass (target tvm) writes a block-diagonal layer as Gather + batched MatMul; after import and
constant folding that is ``reshape(matmul(take(x, idx, axis=-1), Wg))`` (or, with ``gather="elements"``,
``reshape(matmul(reshape(gather_elements(x, idx, axis=1)), Wg))``). This pass rewrites it to
``matmul(x, W)`` with the block-diagonal dense constant W, so ``substitute-gemv`` sees one dense layer and
the grouped kernel skips the zero blocks itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels.tvm.passes._rewrite import RewritePass, const_array, rewrite_bindings, static_shape


class DensifyGrouped(RewritePass):
    """Folds constants, then rewrites each grouped layer to a dense matmul (reports nothing: the kernel
    it becomes is reported by substitute-gemv)."""

    pass_name = "DensifyGrouped"

    def rewrite(self, mod: Any) -> Any:
        import tvm
        from tvm import relax

        op_take = tvm.ir.Op.get("relax.take")
        op_matmul = tvm.ir.Op.get("relax.matmul")
        op_reshape = tvm.ir.Op.get("relax.reshape")
        op_gather_elements = tvm.ir.Op.get("relax.gather_elements")

        def dense(rw: Any, binding: Any) -> tuple[Any, str] | None:
            def val(e: Any) -> Any:
                return rw.lookup_binding(e) if isinstance(e, relax.Var) else e

            v = binding.value
            if not (isinstance(v, relax.Call) and v.op == op_reshape):
                return None
            mm = val(v.args[0])
            if not (isinstance(mm, relax.Call) and mm.op == op_matmul):
                return None
            tk = val(mm.args[0])
            wg = const_array(mm.args[1])
            if not isinstance(tk, relax.Call) or wg is None or wg.ndim != 3:
                return None
            if tk.op == op_reshape:  # GatherElements(x, idx[1, G*K], axis=1) -> Reshape [1, G, 1, K]
                ge = val(tk.args[0])
                if not (isinstance(ge, relax.Call) and ge.op == op_gather_elements and int(ge.attrs.axis) in (1, -1)):
                    return None
                tk = ge
            elif tk.op != op_take or int(tk.attrs.axis) not in (-1, 1):
                return None
            idx = const_array(tk.args[1])
            x = tk.args[0]
            xs, out = static_shape(x), static_shape(v)
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
            return relax.op.matmul(rw.visit_expr(x), relax.const(w)), "grouped"

        # Folding makes the modular pass's gather indices (computed from shape_of) plain constants.
        return rewrite_bindings(relax.transform.FoldConstant()(mod), lambda _func: dense)


__all__ = ["DensifyGrouped"]
