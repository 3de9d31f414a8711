"""Loading, checking and describing ONNX models safely."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from toolchain.core.errors import UsageError

_NP_TYPES: dict[int, type] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.BOOL: np.bool_,
}


# Largest input edgec allocates for one evaluation (elements of one input over the whole batch it feeds):
# 2**26 float32 values are 256 MiB. A bigger (or absurd, e.g. 2**31) dimension is refused before allocating.
MAX_INPUT_ELEMENTS = 1 << 26


def check_input_size(shape: tuple[int, ...], what: str) -> None:
    """Refuse (UsageError) an input whose element count exceeds MAX_INPUT_ELEMENTS, before anything allocates it."""
    total = 1
    for d in shape:
        total *= max(int(d), 0)
    if total > MAX_INPUT_ELEMENTS:
        raise UsageError(f"{what} of shape {list(shape)} has {total:,} elements, more than edgec allocates for one "
                         f"input ({MAX_INPUT_ELEMENTS:,}); use a smaller input shape")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # dynamic dims resolved to the given batch size (or 1)
    dtype: str  # numpy dtype name

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    """External data must live inside the model's own folder: no absolute paths, no '..'."""
    base = base.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / loc).resolve()
        if Path(loc).is_absolute() or not target.is_relative_to(base):
            raise UsageError(
                f"ONNX external data location {loc!r} of tensor {tensor.name!r} points outside the "
                f"model's folder {base}; move the data file next to the model and re-save it"
            )
        if not target.is_file():
            raise UsageError(f"ONNX external data file {loc!r} for tensor {tensor.name!r} is missing in {base}")
        fields = {e.key: e.value for e in tensor.external_data}
        size = target.stat().st_size
        try:
            offset = int(fields.get("offset") or 0)
            length = int(fields["length"]) if fields.get("length") else size - offset
        except ValueError:
            offset, length = -1, -1
        if offset < 0 or length < 0 or offset + length > size:
            raise UsageError(
                f"ONNX external data of tensor {tensor.name!r} (offset {fields.get('offset', 0)}, length "
                f"{fields.get('length', '-')}) lies past the end of {loc!r} ({size} bytes); the data file is "
                "truncated or belongs to another model: re-save the model"
            )


def load_onnx(path: Path | str, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX file; a missing, corrupt or truncated file is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"ONNX file {path} does not exist; check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 -- protobuf raises DecodeError and friends
        raise UsageError(
            f"{path} is not a valid ONNX model (corrupt or truncated: {type(e).__name__}); "
            "re-export it or check the download"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise UsageError(f"{path} parsed as an empty ONNX model (truncated or not ONNX); re-export it")
    known = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and not 1 <= o.version <= known:
            raise UsageError(f"{path} declares ONNX opset {o.version}; edgec (onnx {onnx.__version__}) knows opsets "
                             f"1 to {known}: re-export with an opset in that range")
    _check_external_data(model, path.parent)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as e:  # noqa: BLE001 -- whatever the bytes make the loader raise, the file is at fault
        raise UsageError(f"{path}: its external data cannot be read ({type(e).__name__}); re-save the model") from None
    if check:
        try:
            onnx.checker.check_model(model)
        except Exception as e:  # noqa: BLE001 -- ValidationError, or UnicodeDecodeError etc. on corrupt bytes
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UsageError(f"{path} fails the ONNX checker ({type(e).__name__}: {first}); "
                             "fix the exporter output or check the download") from None
    return normalize_legacy(model)


def normalize_legacy(model: onnx.ModelProto) -> onnx.ModelProto:
    """One form for every pass and target: an old-style model (IR version < 4, where every initializer is also
    listed as a graph input, as older exporters and model zoos wrote them) loses those inputs, so its weights are
    constants rather than feeds a runtime asks for, and its IR version is raised to the one its opsets need (at
    least 4). A model already in that form is returned as is."""
    inits = {t.name for t in model.graph.initializer}
    listed = [vi for vi in model.graph.input if vi.name in inits]
    try:
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), True)
    except Exception:  # noqa: BLE001 -- an opset the table does not know: keep the file's own version
        needed = model.ir_version
    ir = max(model.ir_version, needed, 4)
    if not listed and ir == model.ir_version:
        return model
    keep = [vi for vi in model.graph.input if vi.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.ir_version = ir
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_specs(model: onnx.ModelProto, batch: int = 1) -> list[TensorSpec]:
    specs = []
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif i == 0:
                dims.append(batch)
            else:
                raise UsageError(
                    f"input {vi.name!r} has a dynamic non-batch dimension {d.dim_param or '?'}; "
                    "export with static shapes (--input-shape) for edge targets"
                )
        dtype = _NP_TYPES.get(tt.elem_type)
        if dtype is None:
            raise UsageError(f"input {vi.name!r} has unsupported element type {tt.elem_type}")
        specs.append(TensorSpec(vi.name, tuple(dims), np.dtype(dtype).name))
    return specs


def fix_batch(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """A copy whose dynamic leading input dims are pinned to ``batch`` (edge targets want static shapes)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in graph_inputs(m):
        dims = vi.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            dims[0].Clear()
            dims[0].dim_value = batch
    return m


def param_count(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(i.dims) if i.dims else 1 for i in model.graph.initializer))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for n in model.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]))


def ort_session(model: onnx.ModelProto | Path | str | bytes, threads: int = 1, *,
                optimized_out: Path | None = None) -> Any:
    """The one way edgec opens an ONNX Runtime CPU session: quiet logs, ``threads`` intra-op threads, one
    inter-op thread, every graph optimization. ``model``: a ModelProto, serialized bytes, or a path. With
    ``optimized_out`` the optimized graph is saved there (extended level: free of machine-specific layout ops)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_out is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized_out)
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(src if isinstance(src, bytes) else str(src), so,
                                    providers=["CPUExecutionProvider"])
    except (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidArgument, ort_errors.InvalidProtobuf,
            ort_errors.NotImplemented) as e:  # ONNX Runtime refuses the model itself (the checker let it through)
        what = src if isinstance(src, (str, Path)) else "the model"
        reason = " ".join(str(e).split())
        reason = reason.split(" failed:", 1)[-1].strip()[:200]
        raise UsageError(f"ONNX Runtime cannot load {what} ({type(e).__name__}: {reason}); "
                         "fix or re-export the model, or try another --target") from None
