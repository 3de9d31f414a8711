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
functions carry ``edgec.rule`` (``ATTR_RULE``) so ``edgec inspect`` can tell them from tuned ones.
"""

from __future__ import annotations

from typing import Any

from kernels.tvm import ATTR_RULE

RULE_NAME = "vector-inline"
# Inlining a producer read at n places copies its expression n times. A chain of such producers (an
# unrolled recurrence: u_t read twice by step t+1) grows exponentially: T=16 LIF steps made a function
# LLVM did not finish compiling in 10 minutes. A producer is inlined only while the copies it adds stay
# within this many expression nodes; the others keep their own loop nest (vectorized too).
MAX_DUPLICATED_NODES = 32
# Beyond this many blocks a function is not a light kernel; the rule leaves it alone.
MAX_BLOCKS = 128


def _vectorize_inner(sch: Any, loop: Any, lanes: int) -> None:
    extent = int(sch.get(loop).extent)
    if extent < 2:
        return
    if extent > 4 * lanes and extent % lanes == 0:
        loop = sch.split(loop, factors=[None, lanes])[1]
    elif extent > 4 * lanes:
        return  # a long loop that does not split evenly: leave it scalar rather than predicate it
    sch.vectorize(loop)


def _count(node: Any, kind: type, match: Any = None) -> int:
    import tvm_ffi

    n = [0]

    def visit(x: Any) -> None:
        if match is None or match(x):
            n[0] += 1

    tvm_ffi.structural_walk(node, [(kind, visit)], order="post")
    return n[0]


def _store(sch: Any, block_rv: Any) -> Any | None:
    from tvm import tirx

    body = sch.get(block_rv).body
    return body if isinstance(body, tirx.BufferStore) else None


def _loads(stmt: Any, buf: Any) -> int:
    import tvm

    # TVM 0.27: tirx.BufferLoad is a factory; the loads it makes are ir.expr.TensorLoad, buffer in ``source``.
    return _count(stmt, tvm.ir.expr.TensorLoad, lambda x: x.source.same_as(buf))


def _copies_cost(sch: Any, producer_rv: Any, consumer_rvs: list) -> int:
    """Expression nodes duplicated when the producer's value replaces its loads in the consumers:
    (loads - 1) x the producer's expression size. Both inlining directions substitute the same way."""
    store = _store(sch, producer_rv)
    if store is None:
        return 0  # not a plain store: TVM refuses to inline it anyway
    reads = sum(_loads(sch.get(c).body, store.buffer) for c in consumer_rvs)
    return max(reads - 1, 0) * _count(store.value, object)


def _inline(sch: Any, infos: list) -> list:
    """dlight's try_inline, except that a step whose copies would exceed MAX_DUPLICATED_NODES is skipped."""

    def compute_cost(rv: Any) -> int:
        return _copies_cost(sch, rv, list(sch.get_consumers(rv)))

    def reverse_cost(rv: Any) -> int:
        return sum(_copies_cost(sch, p, [rv]) for p in sch.get_producers(rv))

    def attempt(prim: Any, cost: Any) -> int | None:
        for i, info in enumerate(infos):
            if cost(info.block_rv) > MAX_DUPLICATED_NODES:
                continue
            try:
                prim(info.block_rv)
            except Exception:  # noqa: BLE001 -- TVM refuses: not inlinable here, try the next block
                continue
            return i
        return None

    while True:
        i = attempt(sch.compute_inline, compute_cost)
        if i is None:
            i = attempt(sch.reverse_compute_inline, reverse_cost)
        if i is None:
            return infos
        infos.pop(i)


def schedule_func(func: Any, lanes: int, inline: bool = True) -> Any | None:
    """The scheduled ``func`` (marked scheduled), or None when the rule does not apply. ``inline=False``
    only vectorizes each block where it stands (the fallback when an inlined schedule does not lower)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    if _count(func.body, s_tir.SBlock) > MAX_BLOCKS:
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    if inline:
        infos = _inline(sch, infos)
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
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(ATTR_RULE, RULE_NAME)


def covers_fully(func: Any, lanes: int) -> bool:
    """Whether the rule alone serves ``func`` as well as tuning would: it schedules it and every block is
    elementwise (no reduction: vectorizing is all such a kernel needs; a convolution or matmul also needs
    the tiling MetaSchedule searches for, so the rule is only its fallback)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    infos = normalize_prim_func(s_tir.Schedule(func))
    if infos is None or any("R" in info.dom_kind() for info in infos):
        return False
    return _scheduled(func, lanes) is not None


def _lowers(func: Any) -> bool:
    """Whether TVM's TIR lowering accepts the scheduled function (compiled alone, host target: the passes
    that can reject a schedule run before code generation, and a small function compiles in ~0.1 s)."""
    import tvm

    try:
        tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tvm.target.Target("llvm"))
    except Exception:  # noqa: BLE001 -- any lowering failure: keep the naive function
        return False
    return True


def schedule_naive(mod: Any, lanes: int) -> tuple[Any, list[str]]:
    """``mod`` with the rule applied to every PrimFunc still unscheduled; returns (mod, names scheduled)."""
    import tvm

    done: list[str] = []
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or bool((func.attrs or {}).get("tirx.is_scheduled", False)):
            continue
        new = _scheduled(func, lanes)
        if new is not None:
            mod[gv] = new
            done.append(gv.name_hint)
    return mod, sorted(done)


def _scheduled(func: Any, lanes: int) -> Any | None:
    """The rule's schedule that TIR lowering accepts: inlined, else vectorized block by block, else None.
    A partly inlined schedule (the duplication guard stopped some inlines) has failed lowering with
    "buffer used before its definition" (S-KAN's B-spline expansion, 65 blocks); such a function then
    keeps its blocks, each vectorized, and one that still fails stays naive rather than break the build."""
    from tvm.s_tir.schedule import ScheduleError

    for inline in (True, False):
        try:
            new = schedule_func(func, lanes, inline)
        except ScheduleError:
            new = None  # a schedule primitive refused this loop nest
        if new is None:
            return None
        if _lowers(new):
            return new
    return None
