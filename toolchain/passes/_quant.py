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
    _attr,
    copy_model,
    dense_layers,
    get_weight,
    initializers,
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


def qdq_to_integer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Static QDQ dense layers in integer form: ``[MatMul|Gemm](DQ(xq, sx, zx), DQ(Wq, sw, 0)) [+ bias]``
    becomes ``MatMulInteger(xq, Wq, zx) -> Cast -> Mul(sx * sw) [-> Add(bias)]``. The weight stays int8 (a
    compiler that folds the DQ of a constant weight would otherwise keep it as fp32: 4x the bytes) and the
    product is integer arithmetic, the same value up to float rounding. Only per-tensor uint8 activations
    with symmetric int8 weights (zero points 0, ORT's QInt8 default), Gemm with alpha = beta = 1 and no
    transA; anything else stays QDQ. Returns (the model, the names of the rewritten nodes)."""
    out = copy_model(model)
    inits = initializers(out)
    made = {o: n for n in out.graph.node for o in n.output}
    new_nodes: list[onnx.NodeProto] = []
    done: list[str] = []
    for n in out.graph.node:
        nodes = None
        if n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2:
            a, b = made.get(n.input[0]), made.get(n.input[1])
            if _is_dq(a, inits, activation=True) and _is_dq(b, inits, activation=False):
                nodes = _integer_dense(out, n, a, b, inits)  # type: ignore[arg-type]
        new_nodes += nodes if nodes is not None else [n]
        if nodes is not None:
            done.append(n.name)
    if not done:
        return model, []
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    _drop_dead(out)
    return out, done


def _is_dq(node: onnx.NodeProto | None, inits: dict[str, onnx.TensorProto], activation: bool) -> bool:
    """A DequantizeLinear with constant scale and zero point (and, for a weight, a constant input)."""
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return False
    return node.input[1] in inits and node.input[2] in inits and (activation or node.input[0] in inits)


def _integer_dense(model: onnx.ModelProto, n: onnx.NodeProto, a: onnx.NodeProto, b: onnx.NodeProto,
                   inits: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto] | None:
    """The integer-form nodes of one QDQ dense node ``n`` (activation DQ ``a``, weight DQ ``b``), their new
    initializers added to ``model``; None where the node is not in the supported form."""
    val = {name: numpy_helper.to_array(inits[name]) for name in (*a.input[1:3], *b.input[:3])}
    sx, zx = val[a.input[1]], val[a.input[2]]
    wq, sw, zw = val[b.input[0]], val[b.input[1]], val[b.input[2]]
    if sx.size != 1 or zx.size != 1 or zx.dtype != np.uint8:
        return None
    if wq.dtype != np.int8 or wq.ndim != 2 or np.any(zw != 0):
        return None
    if n.op_type == "Gemm" and (_attr(n, "alpha", 1.0) != 1.0 or _attr(n, "beta", 1.0) != 1.0 or _attr(n, "transA", 0)):
        return None
    trans_b = n.op_type == "Gemm" and bool(_attr(n, "transB", 0))
    w_kn = np.ascontiguousarray(wq.T if trans_b else wq)
    cols = w_kn.shape[1]
    if sw.size == 1:
        sw_n = np.full(cols, float(sw.reshape(())), np.float32)
    elif sw.size == cols and int(_attr(b, "axis", 1)) % 2 == (0 if trans_b else 1):  # per output column
        sw_n = sw.astype(np.float32).reshape(-1)
    else:
        return None
    y = n.output[0]
    has_bias = n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] != ""
    w_name, s_name = f"{n.name}__wq_kn", f"{n.name}__dq_scale"
    set_initializer(model, w_name, w_kn)
    set_initializer(model, s_name, (np.float32(sx.reshape(())) * sw_n).astype(np.float32))
    scaled = f"{y}__scaled" if has_bias else y
    nodes = [helper.make_node("MatMulInteger", [a.input[0], w_name, a.input[2]], [f"{y}__i32"], name=n.name),
             helper.make_node("Cast", [f"{y}__i32"], [f"{y}__f32"], to=onnx.TensorProto.FLOAT, name=f"{n.name}__cast"),
             helper.make_node("Mul", [f"{y}__f32", s_name], [scaled], name=f"{n.name}__scale")]
    if has_bias:
        nodes.append(helper.make_node("Add", [scaled, n.input[2]], [y], name=f"{n.name}__bias"))
    return nodes


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is used (repeatedly), then initializers nothing reads."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = outputs | {i for n in model.graph.node for i in n.input}
        keep = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(keep) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(keep)
    used = outputs | {i for n in model.graph.node for i in n.input}
    live = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    del model.graph.value_info[:]


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
        return "calibration.json", {"samples": len(pick), "method": method, "dataset": data.name}

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
