"""fuse-gemv-chains: runs of dense-layer calls as one chain kernel (``kernels.tvm.tir.chain``).

The layers are the ``call_tir``s of the per-layer kernels that take a float x and give a float y with
constant weights: the packed fp32 GEMV, the bf16-weight GEMV (``bf16-weights`` runs just before) and the
whole int8 layer on dot products (dynamic or static quantization inside, ``substitute-gemv``). Fused:

- a run of >= 2 layers (the same row count), each intermediate used once, by the next layer only;
- parallel branches: >= 2 runs that all read one variable and whose ends are exactly the fields of a
  concatenation along the last axis (used by nothing else), with the run that computes that variable when
  the branches are its only users (a supernet's stem and experts): one kernel writing each branch's
  columns of the concatenation;
- either of them followed by a constant gather of its columns (``take`` along the last axis, or the
  transpose / ``gather_nd`` / transpose TVM imports ``logits[:, idx]`` as): copied out at the kernel's end.

Only chains whose constants total at most ``chain_max_kb`` KB are fused; the per-layer PrimFuncs nothing
calls any more are dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm.passes._rewrite import (
    RewritePass,
    bindings_and_uses,
    const_array,
    drop_uncalled,
    rewrite_bindings,
    single_use_runs,
    static_shape,
)
from kernels.tvm.tir.chain import MAX_GATHER_COLUMNS, ChainLayer, ChainStep, chain_kernel, kernel_name
from kernels.tvm.tir.gemv import gemv_params
from kernels.tvm.tir.gemv_bf16 import gemv_bf16_params
from kernels.tvm.tir.int8_dot import dot_params


@dataclass(frozen=True)
class Program:
    """What one chain kernel computes: ``stem`` (a run, maybe empty) then either nothing more or the
    ``branches`` (runs reading the stem's output, or ``x``) written side by side into the concatenation."""

    x: Any  # the input expression
    stem: list[Any]  # layer variables
    branches: list[list[Any]]
    columns: tuple[int, ...] = ()  # y[:, j] = result[:, columns[j]] (``kernels.tvm.tir.chain.chain_kernel``)

    @property
    def layers(self) -> list[Any]:
        return [*self.stem, *(v for b in self.branches for v in b)]


class FuseGemvChains(RewritePass):
    """Replaces each run of dense-layer calls (and each fan of branches into a concatenation) within
    ``cfg.chain_max_kb`` by one chain kernel (0: off); ``report``: one row per chain."""

    pass_name = "FuseGemvChains"

    def rewrite(self, mod: Any) -> Any:
        import tvm
        from tvm import relax

        max_kb = self.cfg.chain_max_kb
        if max_kb <= 0:
            return mod
        op_call_tir = tvm.ir.Op.get("relax.call_tir")
        op_concat = tvm.ir.Op.get("relax.concat")

        def as_layer(value: Any) -> tuple[Any, ChainLayer, str] | None:
            """(x, layer, PrimFunc name) when ``value`` calls a float-in float-out dense kernel with constants."""
            if not (isinstance(value, relax.Call) and value.op == op_call_tir):
                return None
            gv, args = value.args[0], value.args[1]
            func = mod.functions.get(gv) if isinstance(gv, tvm.ir.GlobalVar) else None
            if not isinstance(func, tvm.tirx.PrimFunc) or not isinstance(args, relax.Tuple):
                return None
            consts = [const_array(a) for a in args.fields[1:]]
            if any(c is None for c in consts):
                return None
            kind, params = next(((k, p) for k, p in (("f32", gemv_params(func)), ("bf16", gemv_bf16_params(func)),
                                                      ("i8", dot_params(func))) if p is not None), ("", None))
            if params is None or len(consts) != (4 if kind == "i8" else 2):
                return None
            return args.fields[0], ChainLayer(kind, params, tuple(consts)), gv.name_hint  # type: ignore[arg-type]

        def rewrite_for(func: Any) -> Any:
            if not isinstance(func.body, relax.SeqExpr):
                return None
            bound, uses = bindings_and_uses(func)
            layers = {var: g for var, value in bound.items() if (g := as_layer(value)) is not None}
            runs = single_use_runs({v: g[0] for v, g in layers.items()}, uses)
            run_of_end = {r[-1]: r for r in runs}
            plan: dict[Any, Program] = {}
            in_fan: set[Any] = set()
            for var, value in bound.items():  # fans: branches into a concatenation along the last axis
                fan = self._fan(var, value, op_concat, layers, run_of_end, uses)
                if fan is None:
                    continue
                h, branches = fan
                stem = run_of_end.get(h, []) if uses.get(h, 0) == len(branches) else []
                plan[var] = Program(h if not stem else layers[stem[0]][0], stem, branches)
                in_fan.update(stem, *[b[-1:] for b in branches])
            for r in runs:
                if len(r) >= 2 and r[-1] not in in_fan:
                    plan[r[-1]] = Program(layers[r[0]][0], r, [])
            plan = {v: p for v, p in plan.items()
                    if len({layers[u][1].params.m for u in p.layers}) == 1
                    and sum(layers[u][1].nbytes for u in p.layers) <= max_kb * 1024}
            if not plan:
                return None
            for end in list(plan):  # a column gather after the chain ends it instead
                gather = _column_gather(end, bound, uses)
                if gather is not None:
                    plan[gather[0]] = dataclasses.replace(plan.pop(end), columns=gather[1])
            return lambda rw, binding: self._chain(rw, binding, plan[binding.var], layers) \
                if binding.var in plan else None

        out = rewrite_bindings(mod, rewrite_for)
        return drop_uncalled(out, {n for r in self.report for n in r["replaces"]}) if self.report else out

    @staticmethod
    def _fan(var: Any, value: Any, op_concat: Any, layers: dict[Any, Any], run_of_end: dict[Any, list[Any]],
             uses: dict[Any, int]) -> tuple[Any, list[list[Any]]] | None:
        """(the variable the branches read, the branch runs) when ``var = concat(...)`` along the last axis of
        the ends of >= 2 layer runs (each used only there) that all read one variable."""
        from tvm import relax

        if not (isinstance(value, relax.Call) and value.op == op_concat and isinstance(value.args[0], relax.Tuple)):
            return None
        fields = list(value.args[0].fields)
        shape = static_shape(var)
        axis = int(value.attrs.axis) if value.attrs.axis is not None else 0
        if shape is None or axis not in (-1, len(shape) - 1) or len(fields) < 2:
            return None
        if any(f not in run_of_end or uses.get(f, 0) != 1 for f in fields):
            return None
        branches = [run_of_end[f] for f in fields]
        heads = [layers[b[0]][0] for b in branches]
        if not all(h.same_as(heads[0]) for h in heads):
            return None
        return heads[0], branches

    def _chain(self, rw: Any, binding: Any, prog: Program, layers: dict[Any, Any]) -> tuple[Any, str]:
        """The call_tir of the chain kernel for ``prog`` (its PrimFunc added to the module)."""
        from tvm import relax

        xs, ys = static_shape(prog.x), static_shape(binding.var)
        assert xs is not None and ys is not None
        steps: list[ChainStep] = []
        widths: list[int] = []

        def run_steps(run: list[Any], src: int, dst: int, col0: int) -> None:
            for i, v in enumerate(run):
                layer = layers[v][1]
                if i < len(run) - 1:
                    widths.append(layer.params.n)
                    steps.append(ChainStep(layer, src, len(widths) - 1))
                    src = len(widths) - 1
                else:
                    steps.append(ChainStep(layer, src, dst, col0))

        if not prog.branches:
            run_steps(prog.stem, -1, -1, 0)
        else:
            src = -1
            if prog.stem:
                widths.append(layers[prog.stem[-1]][1].params.n)
                run_steps(prog.stem, -1, len(widths) - 1, 0)
                src = len(widths) - 1
            col = 0
            for b in prog.branches:
                run_steps(b, src, -1, col)
                col += layers[b[-1]][1].params.n
        func, pools = chain_kernel(steps, widths, xs, ys, prog.columns)
        name = f"edgec_gemv_chain_{len(self.report)}"
        gv = rw.builder_.add_func(func.with_attr("global_symbol", name), name)
        self.report.append({"kernel": kernel_name(steps), "func": name, "layers": len(steps),
                            "kinds": sorted({s.layer.kind for s in steps}), "branches": len(prog.branches),
                            "column_gather": bool(prog.columns),
                            "shape": [steps[0].layer.params.k] + [s.layer.params.n for s in steps],
                            "weight_kb": round(sum(p.nbytes for p in pools) / 1024, 1),
                            "replaces": sorted({layers[v][2] for v in prog.layers})})
        call = relax.call_tir(gv, [rw.visit_expr(prog.x), *(relax.const(p) for p in pools)],
                              relax.TensorType(ys, "float32"))
        return call, "gemv_chain"



def _column_gather(var: Any, bound: dict[Any, Any], uses: dict[Any, int]) -> tuple[Any, tuple[int, ...]] | None:
    """(the variable, the constant columns) when the 2-D ``var`` is used only by a gather of its columns along the
    last axis: ``take(var, idx, axis=-1)``, or ``permute_dims(gather_nd(permute_dims(var), idx[:, None]))`` (how
    TVM imports ONNX's ``Transpose -> GatherND -> Transpose``, torch's ``logits[:, idx]``); None otherwise."""
    from tvm import relax

    def user(v: Any, op: str) -> tuple[Any, Any] | None:
        """The binding (variable, call) that is the only use of ``v``, when it calls ``relax.<op>`` on it first."""
        if uses.get(v, 0) != 1:
            return None
        for u, value in bound.items():
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == f"relax.{op}" and \
                    value.args and value.args[0].same_as(v):
                return u, value
        return None

    def transposed(call: Any) -> bool:
        axes = call.attrs.axes
        return axes is not None and [int(a) for a in axes] == [1, 0]

    shape = static_shape(var)
    if shape is None or len(shape) != 2:
        return None
    width = shape[1]
    if (take := user(var, "take")) is not None:
        idx, axis = const_array(take[1].args[1]), take[1].attrs.axis
        if idx is None or idx.ndim != 1 or axis is None or int(axis) not in (1, -1):
            return None
        end, cols = take[0], idx
    else:
        t1 = user(var, "permute_dims")
        g = user(t1[0], "gather_nd") if t1 is not None and transposed(t1[1]) else None
        t2 = user(g[0], "permute_dims") if g is not None and int(g[1].attrs.batch_dims) == 0 else None
        idx = const_array(g[1].args[1]) if g is not None else None
        if t2 is None or not transposed(t2[1]) or idx is None or idx.ndim != 2 or idx.shape[1] != 1:
            return None
        end, cols = t2[0], idx[:, 0]
    if not 0 < cols.size <= MAX_GATHER_COLUMNS or not np.issubdtype(cols.dtype, np.integer):
        return None
    cols = np.where(cols < 0, cols + width, cols)
    if cols.min() < 0 or cols.max() >= width:
        return None
    return end, tuple(int(c) for c in cols)


__all__ = ["FuseGemvChains"]
