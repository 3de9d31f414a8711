"""What every kernel rewrite shares: the module-pass wrapper with its report, the "rewrite every Relax
function, then dead-code elimination" drivers (a PyExprMutator by binding or by call, or a ``relax.dpl``
pattern), binding / use counting, and reading constants and static shapes off Relax expressions. One copy
each; tvm is imported lazily (the classes TVM needs at definition time are built on first use)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any, ClassVar

import numpy as np

from kernels.tvm import KernelConfig

# A binding rewrite: (the mutator, a VarBinding) -> (new value, name hint of its variable), or None to keep
# the binding. The mutator gives ``visit_expr`` (an argument as rewritten so far), ``lookup_binding`` and
# ``builder_`` (``add_func`` for a new PrimFunc).
BindingRewrite = Callable[[Any, Any], "tuple[Any, str] | None"]
# What a binding rewrite returns for a dead binding to leave out (one its replacement absorbed, whose value no longer
# types: e.g. an NCHW op over a tensor a kernel now writes in another layout). Its variable must have no other use.
DROP_BINDING: tuple[Any, str] = (None, "")
# A call rewrite: (the mutator, a Call with its arguments already rewritten) -> the replacement expression.
CallRewrite = Callable[[Any, Any], Any]


class NoMatch(Exception):
    """The subgraph is not one the kernel can fuse; the message says why."""


class RewritePass:
    """Base of the kernel rewrites: a plain class that ``create`` wraps with ``tvm.transform.module_pass``
    (opt level 0, named ``pass_name``). ``report`` holds one row per kernel put in by the last run; the
    TVM pass object forwards the attribute (``p = FuseKan.create(cfg); mod = p(mod); p.report``)."""

    pass_name: ClassVar[str] = ""

    def __init__(self, cfg: KernelConfig) -> None:
        self.cfg = cfg
        self.report: list[dict[str, Any]] = []

    def transform_module(self, mod: Any, _ctx: Any) -> Any:
        self.report = []
        return self.rewrite(mod)

    def rewrite(self, mod: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def create(cls, cfg: KernelConfig) -> Any:
        """This rewrite as a ``tvm.transform.ModulePass`` for ``cfg``."""
        return _module_pass_class(cls)(cfg)


@cache
def _module_pass_class(cls: type[RewritePass]) -> Any:
    import tvm

    return tvm.transform.module_pass(opt_level=0, name=cls.pass_name)(cls)


@cache
def _binding_mutator() -> type:
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class BindingMutator(PyExprMutator):  # type: ignore[misc]
        """Replaces each binding ``rewrite`` returns a value for by a new binding of that value."""

        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.rewrite: BindingRewrite = lambda _rw, _binding: None

        def visit_var_binding_(self, binding: Any) -> None:
            new = self.rewrite(self, binding)
            if new is DROP_BINDING:
                return
            if new is None:
                super().visit_var_binding_(binding)
                return
            value, name = new
            self.set_var_remap(binding.var, self.builder_.emit(value, name))

    return BindingMutator


@cache
def _call_mutator() -> type:
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class CallMutator(PyExprMutator):  # type: ignore[misc]
        """Replaces every call by what ``rewrite`` makes of it (arguments rewritten first)."""

        def __init__(self, mod: Any, rewrite: CallRewrite) -> None:
            super().__init__(mod)
            self.rewrite = rewrite

        def visit_call_(self, call: Any) -> Any:
            return self.rewrite(self, super().visit_call_(call))

    return CallMutator


def mutate_functions(mod: Any, rw: Any, prepare: Callable[[Any], bool] = lambda _func: True) -> Any:
    """``mod`` with the PyExprMutator ``rw`` (built on ``mod``) run over every Relax function that
    ``prepare(func)`` accepts, then dead-code elimination (the bindings a rewrite absorbed, the functions
    nothing calls any more)."""
    from tvm import relax

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and prepare(func):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rw.builder_.get())


def rewrite_bindings(mod: Any, rewrite_for: Callable[[Any], BindingRewrite | None]) -> Any:
    """``mutate_functions`` with the binding rewrite ``rewrite_for(func)`` (a function it gives None for
    stays as it is)."""
    rw = _binding_mutator()(mod)

    def prepare(func: Any) -> bool:
        rw.rewrite = rewrite_for(func)
        return rw.rewrite is not None

    return mutate_functions(mod, rw, prepare)


def rewrite_calls(mod: Any, rewrite: CallRewrite) -> Any:
    """``mutate_functions`` with ``rewrite`` applied to every call."""
    return mutate_functions(mod, _call_mutator()(mod, rewrite))


def rewrite_matches(mod: Any, pattern: Any, rewriter: Callable[[Any, Any], Any]) -> Any:
    """``mod`` with ``relax.dpl.rewrite_call(pattern, rewriter, func)`` run over every Relax function (the
    rewriter gets the matched call and the pattern -> expression map, returns the replacement or the call
    itself), then dead-code elimination."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    funcs = {gv: rewrite_call(pattern, rewriter, f) if isinstance(f, relax.Function) else f
             for gv, f in mod.functions_items()}
    out = tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)
    return relax.transform.DeadCodeElimination()(out)


def bindings_and_uses(func: Any) -> tuple[dict[Any, Any], dict[Any, int]]:
    """var -> bound value, and var -> number of uses (in binding values and the function's result), over
    the variable bindings of ``func``'s blocks."""
    from tvm import relax

    bound: dict[Any, Any] = {}
    uses: dict[Any, int] = {}

    def count(e: Any) -> None:
        if isinstance(e, relax.Var):
            uses[e] = uses.get(e, 0) + 1

    for blk in func.body.blocks:
        for bnd in blk.bindings:
            if isinstance(bnd, relax.VarBinding):
                bound[bnd.var] = bnd.value
                relax.analysis.post_order_visit(bnd.value, count)
    relax.analysis.post_order_visit(func.body.body, count)
    return bound, uses


def const_array(expr: Any) -> np.ndarray | None:
    """The value of a Relax constant, None for anything else."""
    import tvm

    # TVM 0.27 names Relax constants ir.GenericConst, holding the tensor in ``value``.
    if isinstance(expr, tvm.ir.expr.GenericConst):
        v = expr.value
        return v.numpy() if hasattr(v, "numpy") else None
    return None


def static_shape(expr: Any) -> tuple[int, ...] | None:
    """The shape of a Relax tensor expression, None when it is not a tensor or any dimension is symbolic."""
    from tvm import relax

    ty = getattr(expr, "ty", None)  # TVM 0.27: struct info became ``ty`` (relax.TensorType)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError):
        return None


def require_shape(expr: Any) -> tuple[int, ...]:
    """``static_shape``, raising NoMatch where there is none."""
    shape = static_shape(expr)
    if shape is None:
        raise NoMatch("dynamic shape")
    return shape


def const_ints(e: Any) -> list[int]:
    """Integers of a Relax shape / tuple / list of IntImm."""
    vals = getattr(e, "values", None)
    if vals is None:
        vals = list(e.fields) if hasattr(e, "fields") else list(e)
    return [int(getattr(v, "value", v)) for v in vals]


def value_of(rw: Any, e: Any) -> Any:
    """The value bound to the Relax variable ``e`` (None for anything else, or an unbound variable)."""
    from tvm import relax

    return rw.lookup_binding(e) if isinstance(e, relax.Var) else None


def single_use_runs(inputs: dict[Any, Any], uses: dict[Any, int]) -> list[list[Any]]:
    """The maximal runs ``v0 -> v1 -> ...`` over ``inputs`` (a binding's variable -> the variable it reads), in
    which each ``v(i+1)`` reads ``vi`` and ``vi`` has no other use; every variable in exactly one run."""
    nxt = {x: v for v, x in inputs.items() if x in inputs and uses.get(x, 0) == 1}
    runs: list[list[Any]] = []
    for v in inputs:
        if inputs[v] in nxt:
            continue  # not the start of a run
        run = [v]
        while run[-1] in nxt:
            run.append(nxt[run[-1]])
        runs.append(run)
    return runs


def drop_uncalled(mod: Any, names: set[str]) -> Any:
    """``mod`` without the PrimFuncs in ``names`` that no Relax function calls any more (a rewrite replaced
    their calls): they would still be compiled into the library and listed as kernels."""
    import tvm
    from tvm import relax

    used: set[str] = set()

    def visit(e: Any) -> None:
        if isinstance(e, tvm.ir.GlobalVar):
            used.add(e.name_hint)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    for gv in [gv for gv, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint in names and gv.name_hint not in used]:
        del mod[gv]
    return mod


__all__ = ["BindingRewrite", "CallRewrite", "NoMatch", "RewritePass", "bindings_and_uses", "const_array",
           "const_ints", "drop_uncalled", "mutate_functions", "require_shape", "rewrite_bindings", "rewrite_calls",
           "rewrite_matches", "single_use_runs", "static_shape", "value_of"]
