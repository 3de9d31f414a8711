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

from kernels.tvm.passes._rewrite import RewritePass, const_array, rewrite_matches, static_shape


class DensifyGrouped(RewritePass):
    """Folds constants, then rewrites each grouped layer to a dense matmul, by a ``relax.dpl`` pattern
    (reports nothing: the kernel it becomes is reported by substitute-gemv)."""

    pass_name = "DensifyGrouped"

    def rewrite(self, mod: Any) -> Any:
        from tvm import relax
        from tvm.relax.dpl import is_const, is_op, wildcard

        x, idx, wg = wildcard(), is_const(), is_const()
        take = is_op("relax.take")(x, idx)
        gather = is_op("relax.gather_elements")(x, idx)  # then reshaped to [1, G, 1, K]
        grouped = is_op("relax.reshape")(is_op("relax.matmul")(take | is_op("relax.reshape")(gather, wildcard()), wg),
                                         wildcard())

        def densify(call: Any, matched: Any) -> Any:
            w = dense_weight(call, matched[x], matched[take] if take in matched else matched[gather],
                             const_array(matched[idx]), const_array(matched[wg]))
            return call if w is None else relax.op.matmul(matched[x], relax.const(w))

        # Folding makes the modular pass's gather indices (computed from shape_of) plain constants.
        return rewrite_matches(relax.transform.FoldConstant()(mod), grouped, densify)


def dense_weight(out: Any, x: Any, gather: Any, idx: np.ndarray | None, wg: np.ndarray | None) -> np.ndarray | None:
    """The block-diagonal dense (K, G * Ng) weight of ``out = reshape(matmul(gather(x, idx), wg))``, or None
    where the shapes, axis or dtypes are not the modular pass's form."""
    if idx is None or wg is None or wg.ndim != 3 or int(gather.attrs.axis) not in (-1, 1):
        return None
    xs, ys = static_shape(x), static_shape(out)
    g, kg, ng = wg.shape
    if xs is None or ys is None or len(xs) != 2 or xs[0] != 1 or ys != (1, g * ng):
        return None
    if idx.size != g * kg or wg.dtype != np.float32:
        return None
    idx = idx.reshape(g, kg)
    if idx.min() < 0 or idx.max() >= xs[1]:
        return None
    w = np.zeros((xs[1], g * ng), np.float32)
    for j in range(g):  # duplicate (padding) indices carry zero rows: accumulate, never overwrite
        np.add.at(w[:, j * ng:(j + 1) * ng], idx[j], wg[j])
    return w


__all__ = ["DensifyGrouped", "dense_weight"]
