"""Graph helpers shared by the compression passes: dense layers with constant weights, initializer edits.

A "dense layer" is a MatMul whose second input is a constant 2-D initializer, or a Gemm (alpha = beta = 1,
transA = 0) with a constant B. Its effective weight is always presented as ``[in, out]`` (x @ W), whatever
the stored layout, so every pass reasons about one orientation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from toolchain.core.errors import UsageError


@dataclass(frozen=True)
class DenseLayer:
    node: onnx.NodeProto
    index: int  # position in graph.node
    weight: str  # initializer name
    transposed: bool  # stored as [out, in] (Gemm transB=1)
    bias: str | None  # Gemm's C input, if any

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def dense_layers(model: onnx.ModelProto) -> list[DenseLayer]:
    """MatMul / Gemm nodes whose weight is a float32 2-D initializer used by that node only."""
    inits = initializers(model)
    uses = consumers(model)
    out: list[DenseLayer] = []
    for idx, n in enumerate(model.graph.node):
        if n.domain not in ("", "ai.onnx") or n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        w = inits.get(n.input[1])
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT or len(uses.get(w.name, [])) != 1:
            continue
        transposed = False
        bias = None
        if n.op_type == "Gemm":
            if _attr(n, "transA", 0) or _attr(n, "alpha", 1.0) != 1.0 or _attr(n, "beta", 1.0) != 1.0:
                continue
            transposed = bool(_attr(n, "transB", 0))
            bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        out.append(DenseLayer(n, idx, w.name, transposed, bias))
    return out


def get_weight(model: onnx.ModelProto, layer: DenseLayer) -> np.ndarray:
    """The layer's weight as ``[in, out]`` float32."""
    w = numpy_helper.to_array(initializers(model)[layer.weight]).astype(np.float32)
    return np.ascontiguousarray(w.T if layer.transposed else w)


def set_weight(model: onnx.ModelProto, layer: DenseLayer, w_in_out: np.ndarray) -> None:
    """Replace the layer's weight (given as ``[in, out]``) in place, keeping its stored layout."""
    set_initializer(model, layer.weight, w_in_out.T if layer.transposed else w_in_out)


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
            return
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))


def remove_initializer(model: onnx.ModelProto, name: str) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            del model.graph.initializer[i]
            return


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def require_layers(model: onnx.ModelProto, pass_name: str) -> list[DenseLayer]:
    layers = dense_layers(model)
    if not layers:
        raise UsageError(f"pass {pass_name}: the model has no MatMul/Gemm with a constant 2-D float weight; "
                         "apply it to a model with dense layers (or run cleanup first to fold constants)")
    return layers


def select(layers: list[DenseLayer], names: tuple[str, ...]) -> list[DenseLayer]:
    """Layers whose node name or weight name is in ``names`` (all when empty)."""
    if not names:
        return layers
    chosen = [ly for ly in layers if ly.name in names or ly.weight in names]
    if not chosen:
        raise UsageError(f"none of the layers {', '.join(names)} exist; valid: {', '.join(ly.name for ly in layers)}")
    return chosen


def weight_bytes(model: onnx.ModelProto) -> int:
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))
