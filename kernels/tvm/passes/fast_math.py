"""fast-exp: vectorizable ``exp`` and ``sigmoid`` for the generic lowering (profile ``kernels.fast_exp``).

TVM lowers ``exp`` (and ``sigmoid``, which is ``1 / (1 + exp(-x))``) to LLVM's ``llvm.exp`` intrinsic,
which LLVM scalarizes into one libm ``expf`` call per element, even inside a vectorized loop: an RBF
basis expansion (a Conv-KAN layer: 8 Gaussians per pixel) then spends most of its time in ``expf``.
This pass replaces every float32 ``relax.exp`` / ``relax.sigmoid`` by a ``call_tir`` of the same
elementwise function written with ``kernels.tvm.tir._elementwise.fast_exp`` (Cephes' expf: plain
arithmetic that vectorizes, about 1 ulp; the fused KAN kernel uses the same function). Measured against
numpy over [-87, 88] its relative error is below 5e-7 (``tests/kernels/tvm/test_vector_rule.py``), far
inside edgec's 1e-4 parity bound.

Only these two ops are rewritten. TVM's own ``FastMathTransform`` would also swap softmax, erf and tanh
for approximations with larger errors.
"""

from __future__ import annotations

from typing import Any

from kernels.tvm.passes._rewrite import RewritePass, rewrite_calls
from kernels.tvm.tir._elementwise import fast_exp, fast_sigmoid


def _elementwise(fn: Any, name: str) -> Any:
    """A TE function applying the scalar ``fn`` to every element of its tensor argument."""

    def compute(x: Any) -> Any:
        from tvm import te, topi

        return te.compute(x.shape, lambda *i: fn(x(*i)), name=name, tag=topi.tag.ELEMWISE)

    return compute


class FastMath(RewritePass):
    """Replaces float32 exp / sigmoid by fast_exp based calls; ``report``: one row per op kind replaced,
    with its count."""

    pass_name = "FastMath"

    def rewrite(self, mod: Any) -> Any:
        import tvm

        op_exp, op_sigmoid = tvm.ir.Op.get("relax.exp"), tvm.ir.Op.get("relax.sigmoid")
        counts = {"fast_exp": 0, "fast_sigmoid": 0}
        te_exp, te_sigmoid = _elementwise(fast_exp, "T_fast_exp"), _elementwise(fast_sigmoid, "T_fast_sigmoid")

        def replace(rw: Any, call: Any) -> Any:
            if call.op not in (op_exp, op_sigmoid) or str(getattr(call.args[0].ty, "dtype", "")) != "float32":
                return call
            name = "fast_exp" if call.op == op_exp else "fast_sigmoid"
            counts[name] += 1
            return rw.builder_.call_te(te_exp if call.op == op_exp else te_sigmoid, call.args[0],
                                       primfunc_name_hint=name)

        out = rewrite_calls(mod, replace)
        self.report = [{"op": name, "count": n} for name, n in counts.items() if n]
        return out


__all__ = ["FastMath"]
