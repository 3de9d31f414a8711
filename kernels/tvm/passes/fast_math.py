"""Vectorizable ``exp`` and ``sigmoid`` for the generic lowering (profile ``kernels.fast_exp``).

TVM lowers ``exp`` (and ``sigmoid``, which is ``1 / (1 + exp(-x))``) to LLVM's ``llvm.exp`` intrinsic,
which LLVM scalarizes into one libm ``expf`` call per element, even inside a vectorized loop: an RBF
basis expansion (a Conv-KAN layer: 8 Gaussians per pixel) then spends most of its time in ``expf``.
TOPI's ``fast_exp`` (range reduction to 2^n * e^r plus a degree-7 polynomial, clamped to the float
range) is plain arithmetic that vectorizes; measured against ``numpy.exp`` over [-88, 88] its
relative error is below 5e-7, about 4 float32 ulp (``kernels/tvm/test_vector_rule.py``), far inside edgec's 1e-4 parity bound.

Only these two ops are rewritten. TVM's own ``FastMathTransform`` would also swap softmax, erf and tanh
for approximations with larger errors.
"""

from __future__ import annotations

from typing import Any


def fast_sigmoid(x: Any) -> Any:
    from tvm import te, topi

    one = te.const(1.0, x.dtype)
    return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))


def rewrite_exp(mod: Any) -> tuple[Any, int]:
    """``mod`` with every float32 ``relax.exp`` / ``relax.sigmoid`` replaced by a TOPI fast_exp based
    call_tir; returns (mod, number of calls replaced)."""
    import tvm
    from tvm import relax, topi
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op_exp, op_sigmoid = tvm.ir.Op.get("relax.exp"), tvm.ir.Op.get("relax.sigmoid")
    count = [0]

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op not in (op_exp, op_sigmoid) or str(getattr(call.args[0].ty, "dtype", "")) != "float32":
                return call
            count[0] += 1
            fn = topi.fast_exp if call.op == op_exp else fast_sigmoid
            return self.builder_.call_te(fn, call.args[0], primfunc_name_hint="fast_exp" if call.op == op_exp
                                         else "fast_sigmoid")

    rw = _Rewrite(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return rw.builder_.get(), count[0]
