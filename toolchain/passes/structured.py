"""structured: neuron (channel) pruning that physically slices consecutive dense layers.

For a chain ``A (MatMul/Gemm) -> [Add bias] -> [elementwise activation] -> B (MatMul/Gemm)`` the hidden
neurons with the smallest ``||W_A[:, j]|| * ||W_B[j, :]||`` are removed: columns of W_A and its bias, rows
of W_B. The model gets smaller and every later kernel does less work, on any target. Neurons whose
weights and bias are all zero are removed exactly (no change in outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from toolchain.passes import PassContext, PassResult
from toolchain.passes._graph import (
    DenseLayer,
    consumers,
    copy_model,
    dense_layers,
    get_weight,
    initializers,
    require_layers,
    set_initializer,
    set_weight,
)
from toolchain.passes._speed import (
    MIN_GAIN,
    check_target,
    single_layer_model,
    threads_of,
    time_pair,
)

# Per-neuron ops: slicing neurons before them is the same as slicing after.
ELEMENTWISE = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Gelu", "Elu", "Selu", "Softplus", "HardSigmoid",
               "HardSwish", "Mish", "Identity"}


@dataclass(frozen=True)
class Config:
    keep: float = 0.5  # fraction of hidden neurons kept
    align: int = 8  # kept count rounded up to a multiple (SIMD width); 1 = exact
    layers: tuple[str, ...] = ()  # names of the first layer (A) of chains to prune; empty = all
    measure: bool = False
    only_if_faster: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")


@dataclass(frozen=True)
class Chain:
    a: DenseLayer
    bias: str | None  # bias initializer of A (Gemm C or a following Add)
    acts: tuple[onnx.NodeProto, ...]
    b: DenseLayer


def find_chains(model: onnx.ModelProto) -> list[Chain]:
    layers = dense_layers(model)
    by_out = {ly.node.output[0]: ly for ly in layers}
    uses = consumers(model)
    inits = initializers(model)
    graph_outs = {o.name for o in model.graph.output}
    chains = []
    for name, a in by_out.items():
        bias = a.bias
        if bias is not None and len(inits[bias].dims) != 1:
            continue
        acts: list[onnx.NodeProto] = []
        cur = name
        while True:
            nxt = uses.get(cur, [])
            if len(nxt) != 1 or cur in graph_outs:
                break
            n = nxt[0]
            if n.op_type == "Add" and bias is None and not acts and len(n.input) == 2:
                other = n.input[1] if n.input[0] == cur else n.input[0]
                if other in inits and len(inits[other].dims) == 1 and len(uses.get(other, [])) == 1:
                    bias, acts = other, [n]
                    cur = n.output[0]
                    continue
            if n.op_type in ELEMENTWISE:
                acts.append(n)
                cur = n.output[0]
                continue
            b = by_out.get(n.output[0])
            if b is not None and n.input[0] == cur:
                chains.append(Chain(a, bias, tuple(x for x in acts if x.op_type != "Add"), b))
            break
    return chains


def _pair_models(wa: np.ndarray, ba: np.ndarray | None, acts: tuple[onnx.NodeProto, ...], wb: np.ndarray,
                 ) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "WA"], ["h0"])]
    inits = [numpy_helper.from_array(wa, "WA"), numpy_helper.from_array(wb, "WB")]
    cur = "h0"
    if ba is not None:
        nodes.append(helper.make_node("Add", [cur, "BA"], ["h1"]))
        inits.append(numpy_helper.from_array(ba, "BA"))
        cur = "h1"
    for i, act in enumerate(acts):
        n = onnx.NodeProto()
        n.CopyFrom(act)
        del n.input[:]
        del n.output[:]
        n.input.append(cur)
        n.output.append(f"a{i}")
        n.name = f"act{i}"
        nodes.append(n)
        cur = f"a{i}"
    nodes.append(helper.make_node("MatMul", [cur, "WB"], ["y"]))
    return single_layer_model(nodes, inits, "x", wa.shape[0], "y")


def run(model: onnx.ModelProto, cfg: Config, ctx: PassContext | None = None) -> PassResult:
    ctx = ctx or PassContext()
    check_target(ctx.target, cfg.measure, cfg.only_if_faster, "structured")
    out = copy_model(model)
    require_layers(out, "structured")
    chains = [c for c in find_chains(out) if not cfg.layers or c.a.name in cfg.layers or c.a.weight in cfg.layers]
    rows: list[dict[str, Any]] = []
    changed = False
    for c in chains:
        wa, wb = get_weight(out, c.a), get_weight(out, c.b)
        ba = numpy_helper.to_array(initializers(out)[c.bias]).astype(np.float32) if c.bias else None
        hidden = wa.shape[1]
        dead = (np.abs(wa).sum(0) == 0) & ((ba == 0) if ba is not None else True)
        score = np.linalg.norm(wa, axis=0) * np.linalg.norm(wb, axis=1)
        score[dead] = -1.0  # dead neurons go first: removing them is exact
        k = max(int(np.ceil(cfg.keep * hidden)), int((~dead).sum()) if cfg.keep >= 1.0 else 1)
        k = min(hidden, -(-k // cfg.align) * cfg.align)
        keep = np.sort(np.argsort(-score, kind="stable")[:k])
        row: dict[str, Any] = {"layer": c.a.name, "next": c.b.name, "neurons_before": hidden, "neurons": int(k),
                               "density": round(k / hidden, 4),
                               "dead_removed": int(dead[~np.isin(np.arange(hidden), keep)].sum())}
        if k == hidden:
            rows.append({**row, "applied": False, "why": "nothing to remove"})
            continue
        wa2, wb2 = wa[:, keep], wb[keep, :]
        ba2 = ba[keep] if ba is not None else None
        if cfg.measure or cfg.only_if_faster:
            t = time_pair(_pair_models(wa, ba, c.acts, wb), _pair_models(wa2, ba2, c.acts, wb2), "x", wa.shape[0],
                          threads_of(ctx))
            row.update(measured_on=ctx.target, **t.to_json())
            if cfg.only_if_faster and t.speedup < MIN_GAIN:
                rows.append({**row, "applied": False, "neurons": hidden, "density": 1.0,
                             "why": f"sliced pair not faster on {ctx.target}; kept"})
                continue
        set_weight(out, c.a, wa2)
        set_weight(out, c.b, wb2)
        if ba2 is not None and c.bias:
            set_initializer(out, c.bias, ba2)
        rows.append({**row, "applied": True})
        changed = True
    if changed:
        del out.graph.value_info[:]
        out = onnx.shape_inference.infer_shapes(out)
    note = None if chains else "no MatMul/Gemm -> activation -> MatMul/Gemm chain found; nothing sliced"
    return PassResult(out, changed, {"layers": rows, "target": ctx.target, "note": note})
