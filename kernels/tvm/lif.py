"""Fused LIF over T steps: the whole membrane recurrence of a spiking layer in one TIR loop.

A spiking layer exported with all T steps unrolled (the zoo's ``SpikingMLP``: one matmul over T*B rows
for the stateless part, then per step ``u = beta*u + I_t; s = (u - theta > 0); reset``) becomes, after
ONNX import, ~8 tiny elementwise ops per step on (B, N) tensors, strided slices of the current matrix
C (T*B, N) and a final concat of the T spike tensors. Generic lowering runs each as its own kernel
(~60 launches per layer at T=8, every intermediate through memory).

``extract_recurrence`` reads that per-neuron graph off the Relax IR (any elementwise recurrence whose
inputs are row slices of ONE tensor C and scalar constants; the LIF shape is not hard-coded), and
``fused_recurrence_kernel`` evaluates it for a vector of neurons at a time, all T steps in registers:

    for each chunk of L neurons (L = the profile's vector lanes):
        u, s for t = 0..T-1 computed from C[t, chunk] in registers; store S[t, chunk]

The stateless matmul for all T steps stays one GEMV-shaped kernel (M = T*B rows) before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.tvm.relax_match import NoMatch, const_ints, static_shape

KERNEL_NAME = "lif-fused-f32"

UNARY = ("negative", "floor", "exp", "tanh", "sigmoid", "abs")
BINARY = ("add", "subtract", "multiply", "divide", "greater", "greater_equal", "less", "less_equal",
          "maximum", "minimum", "logical_and", "logical_or")


@dataclass
class Recurrence:
    """Per-neuron graph: nodes in topological order; outputs are the concat's parts, in order."""

    nodes: list[tuple[Any, ...]] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    source: Any = None  # the Relax var C of shape (T*B, N)
    rows: int = 0  # T*B


def extract_recurrence(concat: Any, lookup: Any, const_of: Any) -> Recurrence:
    """The graph behind ``concat((p_0, ..., p_{T-1}), axis=0)`` with every p_t of shape (1, N)."""
    import tvm
    from tvm import relax

    parts = list(concat.args[0].fields)
    part_shape = static_shape(parts[0])
    if len(part_shape) != 2 or part_shape[0] != 1 or any(static_shape(p) != part_shape for p in parts):
        raise NoMatch("parts are not (1, N)")
    n = part_shape[1]
    g = Recurrence()
    memo: dict[Any, int] = {}

    def add(node: tuple[Any, ...]) -> int:
        g.nodes.append(node)
        return len(g.nodes) - 1

    def visit(e: Any) -> int:
        if e in memo:
            return memo[e]
        c = const_of(e)
        if c is not None:
            a = np.asarray(c, dtype=np.float64).reshape(-1)
            if a.size == 0 or not np.all(a == a[0]):
                raise NoMatch("non-uniform constant")
            nid = add(("const", float(a[0])))
        else:
            val = lookup(e) if isinstance(e, relax.Var) else e
            if not isinstance(val, relax.Call) or not isinstance(val.op, tvm.ir.Op):
                raise NoMatch("leaf that is not a row slice")
            nid = visit_call(val)
        memo[e] = nid
        return nid

    def visit_call(call: Any) -> int:
        name = call.op.name.removeprefix("relax.")
        if static_shape(call) not in ((1, n), (n,)):
            raise NoMatch(f"{name} on another shape")
        if name == "strided_slice":
            src = call.args[0]
            axes, begin, end = const_ints(call.args[1]), const_ints(call.args[2]), const_ints(call.args[3])
            strides = const_ints(call.args[4]) if len(call.args) > 4 else [1]
            ss = static_shape(src)
            if axes != [0] or strides != [1] or len(ss) != 2 or ss[1] != n or end[0] - begin[0] != 1:
                raise NoMatch("slice is not one row")
            if g.source is None:
                g.source, g.rows = src, ss[0]
            elif not g.source.same_as(src):
                raise NoMatch("rows of two tensors")
            return add(("row", begin[0] % ss[0]))
        if name == "astype":
            if str(call.attrs.dtype) not in ("float32", "bool"):
                raise NoMatch("astype")
            a = visit(call.args[0])
            return a if str(call.attrs.dtype) == "float32" else add(("unary", "to_bool", a))
        if name in UNARY:
            return add(("unary", name, visit(call.args[0])))
        if name in BINARY:
            return add(("binary", name, visit(call.args[0]), visit(call.args[1])))
        raise NoMatch(f"op {name}")

    g.outputs = [visit(p) for p in parts]
    if g.source is None or g.rows != len(parts):
        raise NoMatch("outputs do not follow the rows of one tensor")
    return g


def fused_recurrence_kernel(g: Recurrence, n: int, lanes: int) -> Any:
    """PrimFunc ``(c[T, N], s[T, N])``: every output step of the recurrence for all neurons."""
    import tvm
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    from tvm.tirx import FloatImm, Select

    f32 = "float32"
    t_out = len(g.outputs)
    one, zero = FloatImm(f32, 1.0), FloatImm(f32, 0.0)
    un = {"negative": lambda a: -a, "floor": tvm.tirx.floor, "exp": tvm.tirx.exp, "tanh": tvm.tirx.tanh,
          "sigmoid": tvm.tirx.sigmoid, "abs": tvm.tirx.abs, "to_bool": lambda a: Select(a != zero, one, zero)}
    cmp = {"greater": lambda a, b: a > b, "greater_equal": lambda a, b: a >= b, "less": lambda a, b: a < b,
           "less_equal": lambda a, b: a <= b}
    bi = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b, "multiply": lambda a, b: a * b,
          "divide": lambda a, b: a / b, "maximum": tvm.tirx.max, "minimum": tvm.tirx.min,
          "logical_and": lambda a, b: a * b, "logical_or": tvm.tirx.max}

    def body(c: Any, s: Any, scratch: Any, j0: Any, l: Any, width: int) -> None:
        val: dict[int, Any] = {}
        for i, nd in enumerate(g.nodes):
            if nd[0] == "const":
                val[i] = FloatImm(f32, nd[1])
                continue
            if nd[0] == "row":
                e = c[nd[1], j0 + l]
            elif nd[0] == "unary":
                e = un[nd[1]](val[nd[2]])
            elif nd[1] in cmp:
                e = Select(cmp[nd[1]](val[nd[2]], val[nd[3]]), one, zero)
            else:
                e = bi[nd[1]](val[nd[2]], val[nd[3]])
            # every node through a register-resident scratch row: shared subexpressions computed once
            T.buffer_store(scratch, e, [i, l])
            val[i] = scratch[i, l]
        for t, o in enumerate(g.outputs):
            T.buffer_store(s, val[o], [t, j0 + l])

    chunks, rem = n // lanes, n % lanes
    with IRBuilder() as ib, T.prim_func():
        T.func_name("lif_fused")
        # op_pattern 8 (opaque): Relax's pattern analysis would otherwise inspect this block-free
        # elementwise kernel as a potential reshape (and fail); opaque also keeps it out of fusion.
        T.func_attr({"tirx.noalias": True, "edgec.kernel": KERNEL_NAME, "tirx.is_scheduled": True,
                     "op_pattern": 8})
        c = T.arg("c", T.buffer((g.rows, n), f32))
        s = T.arg("s", T.buffer((t_out, n), f32))
        scratch = T.alloc_buffer((len(g.nodes), lanes), f32, scope="local")
        if chunks:
            with T.serial(0, chunks) as ci, T.vectorized(0, lanes) as l:
                body(c, s, scratch, ci * lanes, l, lanes)
        if rem:
            with T.vectorized(0, rem) as l:
                body(c, s, scratch, chunks * lanes, l, rem)
    return ib.get()


__all__ = ["KERNEL_NAME", "NoMatch", "Recurrence", "extract_recurrence", "fused_recurrence_kernel"]
