"""A rule-based CPU schedule for the light kernels no hand-written kernel covers and tuning skips.

TVM 0.27's default CPU pipeline leaves every PrimFunc unscheduled, and its ``dlight`` CPU rules
cover only GEMV and row reductions: an elementwise chain (a KAN basis expansion, a batch norm, a
concat) or a small pooling window runs as one scalar loop nest per op, with every intermediate
written to memory. MetaSchedule can schedule them, but one batch of 16 trials per kernel costs
about a minute each on this machine, for kernels of a few microseconds (convkan has eight of them).

The rule here is what those tuned schedules converge to, applied in milliseconds:

1. inline every block that can be inlined (the elementwise chain becomes one loop nest, no
   intermediate buffers);
2. per remaining block, spatial loops outside, reduction loops (a pooling window) inside them but
   outside the innermost spatial loop, which is vectorized: split by the profile's vector lanes
   when it is long, whole when it is short (LLVM legalizes a 28-wide vector into 16 + 8 + 4);
3. reductions get their init split off after that, so the init loop is vectorized the same way.

A function the rule cannot schedule stays unscheduled (and is reported as naive). Scheduled
functions carry ``edgec.rule`` so ``edgec inspect`` can tell them from tuned ones.
"""

from __future__ import annotations

from typing import Any

RULE_NAME = "vector-inline"


def _vectorize_inner(sch: Any, loop: Any, lanes: int) -> None:
    extent = int(sch.get(loop).extent)
    if extent < 2:
        return
    if extent > 4 * lanes and extent % lanes == 0:
        loop = sch.split(loop, factors=[None, lanes])[1]
    elif extent > 4 * lanes:
        return  # a long loop that does not split evenly: leave it scalar rather than predicate it
    sch.vectorize(loop)


def schedule_func(func: Any, lanes: int) -> Any | None:
    """The scheduled ``func`` (marked scheduled), or None when the rule does not apply."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline(sch, infos)
    for info in infos:
        kinds = info.dom_kind()
        if "O" in kinds:
            return None  # opaque iterators (scatter, sort): not this rule's kind of kernel
        block = info.block_rv
        loops = sch.get_loops(block)
        s_loops = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
        r_loops = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
        if not s_loops:
            continue  # a full reduction to a scalar: leave its loop as is
        if r_loops:
            sch.reorder(*s_loops[:-1], *r_loops, s_loops[-1])
        _vectorize_inner(sch, s_loops[-1], lanes)
        if r_loops:  # after vectorizing (the split-off init copies the inner loops, vectorized too)
            sch.decompose_reduction(block, r_loops[0])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("edgec.rule", RULE_NAME)


def schedule_naive(mod: Any, lanes: int) -> tuple[Any, list[str]]:
    """``mod`` with the rule applied to every PrimFunc still unscheduled; returns (mod, names scheduled)."""
    import tvm
    from tvm.s_tir.schedule import ScheduleError

    done: list[str] = []
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or bool((func.attrs or {}).get("tirx.is_scheduled", False)):
            continue
        try:
            new = schedule_func(func, lanes)
        except ScheduleError:
            new = None  # a schedule primitive refused this loop nest: it stays naive (and reported)
        if new is not None:
            mod[gv] = new
            done.append(gv.name_hint)
    return mod, sorted(done)
