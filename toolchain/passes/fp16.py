"""fp16: convert a float32 model to float16 (or bfloat16) with an op block-list; I/O stay float32.

Written directly on the ONNX graph (onnxconverter-common is not a dependency): every float tensor consumed
by a non-blocked node is half precision; Cast nodes are inserted exactly where a half value meets a blocked
(float32) node or a graph output. Float initializers are converted once (duplicated when blocked nodes
share them). Family defaults keep KAN basis / spiking threshold math (by node name / metadata) in fp32.

ORT's CPU provider runs fp16 models by inserting casts around ops that lack fp16 kernels (correct, rarely
faster); it has no bfloat16 MatMul, so bf16 models are for TVM / TensorRT targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from toolchain.passes import PassContext, PassResult
from toolchain.passes._graph import copy_model
from toolchain.passes._quant import family_marked

# Numerically fragile in half precision (range / accumulation), or carry a dtype attribute we would have to edit.
DEFAULT_BLOCK = ("Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div", "Softmax", "LogSoftmax", "ReduceSum",
                 "ReduceMean", "ReduceProd", "ReduceLogSumExp", "Erf", "Range", "Resize", "Cast", "CastLike",
                 "Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                 "RandomUniformLike", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Where",
                 "Loop", "If", "Scan")
KINDS = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Config:
    dtype: str = "float16"  # float16 | bfloat16
    block: tuple[str, ...] = ()  # extra op types (or node names) kept in fp32, on top of DEFAULT_BLOCK
    family_defaults: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in KINDS:
            raise ValueError(f"dtype must be float16 or bfloat16, got {self.dtype!r}")


def _half_tensor(t: TensorProto, kind: int, name: str) -> TensorProto:
    a = numpy_helper.to_array(t).astype(np.float32)
    if kind == TensorProto.FLOAT16:
        return numpy_helper.from_array(a.astype(np.float16), name)
    # bfloat16: round-to-nearest-even on the upper 16 bits, stored as uint16 raw data
    bits = a.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, rounded.tobytes(), raw=True)


def run(model: onnx.ModelProto, cfg: Config, ctx: PassContext | None = None) -> PassResult:
    kind = KINDS[cfg.dtype]
    m = onnx.shape_inference.infer_shapes(copy_model(model))
    g = m.graph
    etype: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        etype[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        etype[t.name] = t.data_type
    block = set(DEFAULT_BLOCK) | set(cfg.block)

    def is_low(n: onnx.NodeProto) -> bool:
        if n.op_type in block or n.name in block or n.domain not in ("", "ai.onnx"):
            return False
        if cfg.family_defaults and family_marked(n):
            return False
        outs = [o for o in n.output if o]
        return all(o in etype for o in outs) and any(etype.get(v) == TensorProto.FLOAT for v in [*n.input, *outs])

    prec: dict[str, bool] = {}  # float value -> currently half?
    half_inits: dict[str, str] = {}
    casts: dict[tuple[str, bool], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    low_count = 0
    for n0 in g.node:
        n = onnx.NodeProto()
        n.CopyFrom(n0)  # the originals are dropped from the graph below
        low = is_low(n)
        low_count += low
        for i, v in enumerate(n.input):
            if not v or etype.get(v) != TensorProto.FLOAT:
                continue
            if v in inits:
                if low:
                    if v not in half_inits:
                        half_inits[v] = f"{v}__{cfg.dtype}"
                        new_inits.append(_half_tensor(inits[v], kind, half_inits[v]))
                    n.input[i] = half_inits[v]
                continue
            if prec.get(v, False) != low:
                key = (v, low)
                if key not in casts:
                    casts[key] = f"{v}__to_{cfg.dtype if low else 'float'}"
                    new_nodes.append(helper.make_node("Cast", [v], [casts[key]], to=kind if low else TensorProto.FLOAT,
                                                      name=f"cast_{casts[key]}"))
                n.input[i] = casts[key]
        for o in n.output:
            if o and etype.get(o) == TensorProto.FLOAT:
                prec[o] = low
        new_nodes.append(n)
    # Graph outputs stay float32: rename a half producer's output and cast back under the public name.
    for out in g.output:
        if prec.get(out.name):
            inner = f"{out.name}__{cfg.dtype}"
            for n in new_nodes:
                for lst in (n.input, n.output):
                    for i, v in enumerate(lst):
                        if v == out.name:
                            lst[i] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT, name=f"cast_{inner}"))
    used = {v for n in new_nodes for v in n.input}
    keep_inits = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend([*keep_inits, *new_inits])
    del g.value_info[:]
    out_model = onnx.shape_inference.infer_shapes(m)
    report: dict[str, Any] = {"dtype": cfg.dtype, "nodes_half": low_count, "nodes_fp32": len(model.graph.node) - low_count,
                              "casts_inserted": len(casts) + sum(1 for o in g.output if prec.get(o.name)),
                              "initializers_converted": len(half_inits)}
    if cfg.dtype == "bfloat16":
        report["note"] = "ONNX Runtime's CPU provider has no bfloat16 MatMul: run this on tvm or tensorrt"
    return PassResult(out_model, low_count > 0, report)
