"""Quantization helpers on top of ONNX Runtime's ``onnxruntime.quantization``: which nodes to quantize
(family-aware), Gemm -> MatMul + Add for the dynamic path, calibration ranges as a cached artifact, and a
batched accuracy evaluation on a labelled set.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from toolchain.core.cache import Cache, StepKey
from toolchain.core.errors import UsageError
from toolchain.core.onnx_io import graph_inputs, input_specs, ort_session
from toolchain.measure.compare import task_accuracy
from toolchain.passes._graph import (
    copy_model,
    dense_layers,
    get_weight,
    remove_initializer,
    set_initializer,
)

# Node names / metadata that mark family math that must stay fp32 by default: KAN basis evaluation,
# spiking membrane / threshold. Only weight matmuls are ever quantized; this also spares weight matmuls
# that sit inside such blocks (e.g. a basis projection whose inputs are not activations in a usual range).
FAMILY_MARKERS = ("basis", "spline", "bspline", "grid", "membrane", "threshold", "spike", "surrogate", "lif")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name (ORT's quantizer selects nodes by name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    return model


def family_marked(n: onnx.NodeProto) -> str | None:
    """The family marker in the node's name, outputs or module path (torch export's ``name_scopes``
    metadata, e.g. ``['', 'layers', 'layers.0', 'basis', 'sub']``). Stack traces and class names are not
    read: they name the whole model's source file, not the role of this node."""
    scopes = [p.value for p in n.metadata_props if p.key.endswith("name_scopes") or p.key == "edgec.role"]
    text = " ".join([n.name, *n.output, *scopes]).lower()
    return next((m for m in FAMILY_MARKERS if m in text), None)


def candidates(model: onnx.ModelProto, family_defaults: bool, keep_fp32: tuple[str, ...]
               ) -> tuple[list[str], dict[str, str]]:
    """(names of nodes to quantize, {name: why kept fp32}) among weight ops with a constant weight."""
    inits = {i.name: i for i in model.graph.initializer}
    chosen: list[str] = []
    kept: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        mark = family_marked(n) if family_defaults else None
        if n.op_type != "Conv" and len(inits[n.input[1]].dims) != 2:
            # e.g. the [G, K, out/G] blocks of a modular-lowered layer: ORT's int8 MatMul kernels take
            # 2-D weights only (per-channel zero points of a 3-D B are rejected at run time).
            kept[n.name] = "batched (3-D) weight: ORT int8 MatMul takes 2-D weights; stays fp32"
        elif n.name in keep_fp32:
            kept[n.name] = "kept fp32 by the user"
        elif mark:
            kept[n.name] = f"family default: {mark!r} math stays fp32 (family_defaults=false to override)"
        else:
            chosen.append(n.name)
    return chosen, kept


def gemm_to_matmul(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Rewrite the named Gemm nodes as MatMul (+ Add): ORT's dynamic int8 path only handles MatMul.
    The MatMul keeps the Gemm's name so reports and selections still line up."""
    out = copy_model(model)
    layers = {ly.node.name: ly for ly in dense_layers(out) if ly.node.op_type == "Gemm" and ly.node.name in names}
    if not layers:
        return out
    new_nodes = []
    for n in out.graph.node:
        ly = layers.get(n.name)
        if ly is None:
            keep = onnx.NodeProto()
            keep.CopyFrom(n)
            new_nodes.append(keep)
            continue
        w = get_weight(out, ly)
        remove_initializer(out, ly.weight)
        w_name = f"{ly.weight}__in_out" if ly.transposed else ly.weight  # a new layout gets a new name
        set_initializer(out, w_name, w)
        y = n.output[0]
        mm_out = f"{y}__mm" if ly.bias else y
        new_nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [mm_out], name=n.name))
        if ly.bias:
            new_nodes.append(helper.make_node("Add", [mm_out, ly.bias], [y], name=f"{n.name}__bias"))
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    del out.graph.value_info[:]  # stale shapes of rewritten values; ORT re-infers them
    return out


def input_feed_shape(model: onnx.ModelProto) -> tuple[str, tuple[int, ...]]:

    specs = input_specs(model)
    if len(specs) != 1:
        raise UsageError(f"quantization with data takes single-input models; this one has {len(specs)} inputs")
    return specs[0].name, specs[0].shape


def dynamic_batch(model: onnx.ModelProto) -> bool:

    d = graph_inputs(model)[0].type.tensor_type.shape.dim
    return bool(d) and not (d[0].HasField("dim_value") and d[0].dim_value > 0)


def batches(model: onnx.ModelProto, x: np.ndarray, bs: int = 256) -> list[dict[str, np.ndarray]]:
    name, shape = input_feed_shape(model)
    x = x.astype(np.float32).reshape(-1, *shape[1:])
    step = bs if dynamic_batch(model) else shape[0]
    return [{name: x[i:i + step]} for i in range(0, len(x) - len(x) % step or len(x), step)]


def predict(model: onnx.ModelProto, x: np.ndarray, threads: int = 1, batch: int = 1) -> np.ndarray:
    """Logits for x, run ``batch`` samples at a time (default 1: dynamic int8 scales activations per call,
    so batch-1 evaluation is what a batch-1 deployment sees)."""
    s = ort_session(model, threads)
    out = s.get_outputs()[0].name
    return np.concatenate([s.run([out], f)[0].reshape(len(next(iter(f.values()))), -1)
                           for f in batches(model, x, bs=batch)])


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (a fraction, as everywhere in edgec) on (x, y), at batch 1."""
    return task_accuracy(predict(model, x), y)


def calibration_ranges(model: onnx.ModelProto, data: Any, cache: Any, samples: int, method: str) -> Path:
    """ORT calibration ranges (TensorsData JSON) for ``model`` on ``samples`` training inputs, stored as
    their own cached artifact keyed by the model bytes, the dataset hash, the sample count and the method."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data


    meth = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]
    digest = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    sk = StepKey("calibration", (digest,), {"data": getattr(data, "sha256", data.name), "samples": samples,
                                             "method": method}, 1)

    def write(d: Path) -> tuple[str, dict[str, Any]]:
        with tempfile.TemporaryDirectory() as td:
            src = Path(td) / "model.onnx"
            onnx.save_model(model, src)
            cal = create_calibrator(src, list(WEIGHT_OPS), augmented_model_path=str(Path(td) / "aug.onnx"),
                                    calibrate_method=meth)
            rng = np.random.default_rng(0)
            pick = rng.choice(len(data.x_train), size=min(samples, len(data.x_train)), replace=False)
            it = iter(batches(model, data.x_train[np.sort(pick)], bs=64))

            class Reader:
                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(it, None)

            cal.collect_data(Reader())
            save_tensors_data(cal.compute_data(), d / "calibration.json")
        return "calibration.json", {"samples": int(len(pick)), "method": method, "dataset": data.name}

    art, _ = (cache or Cache(Path(tempfile.mkdtemp(prefix="edgec-calib-")))).get_or_build(sk, "calibration", write)
    return art.payload


def require_data(data: Any, pass_name: str) -> None:
    if data is None:
        raise UsageError(f"pass {pass_name} needs labelled data for calibration / accuracy and the model names none; "
                         "pass --data fashion-mnist (or an .npz with x, y), or use int8=mode=dynamic")


def check_weight_ops(model: onnx.ModelProto, pass_name: str) -> None:
    if not any(n.op_type in WEIGHT_OPS for n in model.graph.node):
        raise UsageError(f"pass {pass_name}: the model has no MatMul/Gemm/Conv to quantize; nothing to do here")


def weight_bits_report(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for t in model.graph.initializer:
        k = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
        hist[k] = hist.get(k, 0) + int(numpy_helper.to_array(t).nbytes)
    return hist
