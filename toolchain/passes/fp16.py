"""fp16: convert a float32 model to float16 (or bfloat16) with an op block-list; I/O stay float32.

Two forms:

- ``compute``: activations and weights in half precision (what TensorRT and GPUs compute in);
- ``weights``: weight-only. The weight inputs of MatMul / Gemm / Conv (constant, 2-D or more) are stored in
  half precision, each read through one Cast to float32 at the top of the graph; every activation and all
  arithmetic stay float32 (at least fp32 accumulation, no half rounding of activations). TVM folds the Cast
  into a float32 constant whose values are exactly bfloat16, and its kernels store such weights as bf16
  (half the bytes) and widen them in registers (kernels/tvm/passes/bf16_weights.py).

``form=auto`` (the default) is ``weights`` for bfloat16 on the tvm target (a CPU: batch-1 layers are
bound by weight bytes, and TVM legalizes bf16 arithmetic to fp32 anyway), ``compute`` otherwise.

Compute form, written directly on the ONNX graph (onnxconverter-common is not a dependency): every float tensor consumed
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
                 "Loop", "If", "Scan",
                 # normalizations accumulate over a whole axis (TVM's layer_norm takes fp32 / fp16 only)
                 "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
                 "RMSNormalization", "LpNormalization", "MeanVarianceNormalization")
KINDS = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
FORMS = ("auto", "compute", "weights")
WEIGHT_OPS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,)}  # op -> inputs that may be a constant weight
WEIGHTS_FORM_TARGETS = ("tvm",)  # where form=auto stores bfloat16 weights only


@dataclass(frozen=True)
class Config:
    dtype: str = "float16"  # float16 | bfloat16
    block: tuple[str, ...] = ()  # extra op types (or node names) kept in fp32, on top of DEFAULT_BLOCK
    family_defaults: bool = True
    form: str = "auto"  # auto | compute | weights (see the module docstring)

    def __post_init__(self) -> None:
        if self.dtype not in KINDS:
            raise ValueError(f"dtype must be float16 or bfloat16, got {self.dtype!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")

    def resolved_form(self, target: str) -> str:
        """``compute`` or ``weights`` for a build on ``target``."""
        if self.form != "auto":
            return self.form
        return "weights" if self.dtype == "bfloat16" and target in WEIGHTS_FORM_TARGETS else "compute"


def _half_tensor(t: TensorProto, kind: int, name: str) -> TensorProto:
    a = numpy_helper.to_array(t).astype(np.float32)
    if kind == TensorProto.FLOAT16:
        return numpy_helper.from_array(a.astype(np.float16), name)
    # bfloat16: round-to-nearest-even on the upper 16 bits, stored as uint16 raw data
    bits = a.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, rounded.tobytes(), raw=True)


def run(model: onnx.ModelProto, cfg: Config, ctx: PassContext | None = None) -> PassResult:
    form = cfg.resolved_form(ctx.target if ctx is not None else "ort")
    if form == "weights":
        return run_weights(model, cfg)
    return run_compute(model, cfg)


def run_weights(model: onnx.ModelProto, cfg: Config) -> PassResult:
    """Weight-only form: constant float32 weights (2-D or more) of MatMul / Gemm / Conv stored in half
    precision, each cast back to float32 once at the top of the graph; nothing else changes. A weight
    named in ``cfg.block`` (or whose consumer is named there) stays float32."""
    kind = KINDS[cfg.dtype]
    m = copy_model(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    block = set(cfg.block)
    chosen: dict[str, str] = {}  # float32 initializer -> its float32 value computed by the Cast
    kept: set[str] = set()
    for n in g.node:
        positions = WEIGHT_OPS.get(n.op_type, ()) if n.domain in ("", "ai.onnx") else ()
        for i in positions:
            v = n.input[i] if i < len(n.input) else ""
            t = inits.get(v)
            if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) < 2:
                continue
            if n.op_type in block or n.name in block or v in block:
                kept.add(v)
                continue
            chosen.setdefault(v, f"{v}__from_{cfg.dtype}")
    chosen = {v: c for v, c in chosen.items() if v not in kept}
    casts, half = [], []
    for v, cast_out in chosen.items():
        half.append(_half_tensor(inits[v], kind, f"{v}__{cfg.dtype}"))
        casts.append(helper.make_node("Cast", [half[-1].name], [cast_out], to=TensorProto.FLOAT,
                                      name=f"cast_{cast_out}"))
    for n in g.node:
        for i, v in enumerate(n.input):
            if v in chosen:
                n.input[i] = chosen[v]
    nodes = [*casts, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    used = {v for n in g.node for v in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend([*keep, *half])
    before = sum(_nbytes(t) for t in model.graph.initializer)
    after = sum(_nbytes(t) for t in g.initializer)
    report: dict[str, Any] = {"dtype": cfg.dtype, "form": "weights", "weights_half": len(chosen),
                              "weights_fp32": len(kept), "initializer_bytes": after,
                              "initializer_bytes_fp32": before}
    return PassResult(m, bool(chosen), report)


def _nbytes(t: TensorProto) -> int:
    itemsize = {TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8, TensorProto.INT8: 1,
                TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.INT64: 8}.get(t.data_type, 4)
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def _schema_allows(op_type: str, opset: int, dtype: str) -> bool:
    """Whether the op's ONNX schema at ``opset`` takes ``dtype`` wherever it takes float32 (Conv, for
    one, has no bfloat16: a bf16 Conv is an invalid model)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset)
    except onnx.defs.SchemaError:
        return False
    want = f"tensor({dtype})"
    return all(want in tc.allowed_type_strs for tc in schema.type_constraints
               if "tensor(float)" in tc.allowed_type_strs)


def run_compute(model: onnx.ModelProto, cfg: Config) -> PassResult:
    """Compute form: every float tensor of a non-blocked node in half precision."""
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

    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), onnx.defs.onnx_opset_version())

    def is_low(n: onnx.NodeProto) -> bool:
        if n.op_type in block or n.name in block or n.domain not in ("", "ai.onnx"):
            return False
        if not _schema_allows(n.op_type, opset, cfg.dtype):
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
    report: dict[str, Any] = {"dtype": cfg.dtype, "form": "compute", "nodes_half": low_count,
                              "nodes_fp32": len(model.graph.node) - low_count,
                              "casts_inserted": len(casts) + sum(1 for o in g.output if prec.get(o.name)),
                              "initializers_converted": len(half_inits)}
    if cfg.dtype == "bfloat16":
        report["note"] = "ONNX Runtime's CPU provider has no bfloat16 MatMul: run this on tvm or tensorrt"
    return PassResult(out_model, low_count > 0, report)
