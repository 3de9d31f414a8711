"""The weights-as-inputs step: beside ``main``, the same graph with its weight tensors as arguments and a function
that returns them (``toolchain.core.tvm_abi``), so that the runner can place the weights itself.

Why: the Relax VM keeps each constant in its own allocation of 4 KB pages at physical addresses the OS picks at
random. When the weights nearly fill L2 (mlp-1m: 1.48 MB of int8 in a 2 MB, 16-way L2), some cache sets then get
more lines than they hold and those lines come from L3 on every call. A 2 MB transparent huge page is physically
contiguous on bare metal (a Pi, a phone, a Jetson), so every set gets its share. On a VM whose host backs guest
memory with small pages (this build machine) a buffer's placement stays a draw, only a better one: the int8 GEMV
loop over 1.46 MB read 8 huge-page buffers at 110-134 GB/s (mean 126) and 8 plain ones at 94-138 (mean 116),
same bytes, all alive in one process. ``TvmLibRunner`` makes the copy.

Only models whose weight tensors total from the profile's ``contiguous_weights_min_kb`` to its
``contiguous_weights_max_kb`` get the extra entry points (max 0: none). Below the window the sets do not overflow
wherever the pages lie, and every weight argument costs the VM call ~60 ns (kan-fast, 0.47 MB in 20 tensors: 7.6 us
a call with them as arguments, 6.4 us without, interleaved); beyond it the weights stream from L3 or DRAM on every
call, where the placement matters little, and the runner's copy would double their memory. ``main`` is left as it
was, so every caller of it still works; the entry points share the kernels and the VM's constant pool.
"""

from __future__ import annotations

from typing import Any

from toolchain.core.tvm_abi import MAIN, MAIN_WITH_WEIGHTS, WEIGHTS, tensor_nbytes


def weight_constants(func: Any) -> list[Any]:
    """The tensor constants (one dimension or more) in ``func``'s body, each once, in order of first use."""
    import tvm
    from tvm import relax

    seen: list[Any] = []

    def visit(e: Any) -> None:
        # TVM 0.27 names Relax constants ir.GenericConst, the tensor in ``value``
        if isinstance(e, tvm.ir.expr.GenericConst) and hasattr(e.value, "shape") and len(e.value.shape) >= 1 \
                and not any(e.same_as(s) for s in seen):
            seen.append(e)

    relax.analysis.post_order_visit(func.body, visit)
    return seen


def weights_as_inputs(mod: Any, min_kb: int, max_kb: int) -> Any:
    """``mod`` with ``MAIN_WITH_WEIGHTS`` and ``WEIGHTS`` added when ``main``'s weights total from ``min_kb`` to
    ``max_kb`` KB (and there is at least one); otherwise ``mod`` itself."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    names = {gv.name_hint for gv in mod.get_global_vars()}
    if max_kb <= 0 or MAIN not in names or MAIN_WITH_WEIGHTS in names:
        return mod
    main = mod[MAIN]
    consts = weight_constants(main)
    if not consts or not min_kb * 1024 <= sum(tensor_nbytes(c.value) for c in consts) <= max_kb * 1024:
        return mod
    params = [relax.Var(f"weight{i}", c.ty) for i, c in enumerate(consts)]

    @mutator
    class ConstantsToParams(PyExprMutator):  # type: ignore[misc]
        def visit_generic_const_(self, op: Any) -> Any:
            for c, p in zip(consts, params, strict=True):
                if op.same_as(c):
                    return p
            return op

    copy = relax.utils.copy_with_new_vars(main)
    body = ConstantsToParams(mod).visit_expr(copy.body)
    with_weights = relax.Function([*copy.params, *params], body, copy.ret_ty, copy.is_pure, copy.attrs)
    weights = relax.Function([], relax.SeqExpr([], relax.Tuple(consts)),
                             relax.TupleType([c.ty for c in consts]))
    out = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)  # same order
    out[MAIN_WITH_WEIGHTS] = with_weights.with_attr("global_symbol", MAIN_WITH_WEIGHTS)
    out[WEIGHTS] = weights.with_attr("global_symbol", WEIGHTS)
    return out
