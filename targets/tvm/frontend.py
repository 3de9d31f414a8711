"""TVM's side of the door: importing the SDK, the LLVM target of a profile, and the ONNX importer.

The importer is TVM's Relax ONNX frontend with edgec's converters added for the ops it lacks
(``EDGEC_CONVERTERS``): ``ConvInteger`` (what the dynamic int8 pass makes of a Conv).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from toolchain.core.errors import SdkMissing, UsageError
from toolchain.core.onnx_io import fix_batch, input_specs
from toolchain.core.profile import Profile
from toolchain.passes.cleanup import Config as CleanupConfig
from toolchain.passes.cleanup import run as cleanup


def import_tvm() -> Any:
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as e:
        raise SdkMissing(f"TVM is not importable ({e}); "
                         "pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1") from None
    return tvm


def tvm_target(profile: Profile) -> Any:
    tvm = import_tvm()
    return tvm.target.Target(profile.tvm_target())


FP32_EXACT_INT = 1 << 24  # every integer up to 2^24 is exact in float32, and so is every sum that stays below it


def conv_integer(bb: Any, inputs: list[Any], attr: dict[str, Any]) -> Any:
    """ONNX ``ConvInteger`` (uint8 / int8 data and weight, optional zero points, int32 output): conv(x - x_zp,
    w - w_zp) with the zero-point-centred input padded with 0, as ONNX Runtime computes it.

    With a constant weight whose largest possible |output| (255 x the largest per-channel sum of |w - w_zp|) stays
    below 2^24, every product and every partial sum is an exact float32 integer: the conv runs in float32 on the
    centred values (so edgec's direct conv kernel takes it) and converts to int32 exactly -- the same int32
    result as an integer accumulation. Otherwise (a weight computed at run time, or a sum that could reach
    2^24) it is an int32 conv2d (the generic lowering)."""
    from tvm import relax
    from tvm.relax.frontend.common import autopad

    x, w = inputs[0], inputs[1]
    x_zp = inputs[2] if len(inputs) > 2 else None
    w_zp = inputs[3] if len(inputs) > 3 else None
    ndim = len(x.ty.shape)
    if ndim != 4:
        raise ValueError(f"ConvInteger: only 2-D convolutions are converted, got a {ndim}-D input")
    w_value = _constant(w)
    w_zp_value = _constant(w_zp) if w_zp is not None else np.zeros((), np.int32)
    wc: np.ndarray | None = None
    exact_f32 = False
    if w_value is not None and w_zp_value is not None:
        zp = w_zp_value.astype(np.int32)
        wc = w_value.astype(np.int32) - (zp.reshape(-1, 1, 1, 1) if zp.ndim == 1 else zp)
        exact_f32 = 255 * int(np.abs(wc).reshape(wc.shape[0], -1).sum(axis=1).max(initial=0)) < FP32_EXACT_INT
    dtype = "float32" if exact_f32 else "int32"
    xc = relax.op.astype(x, dtype)
    if x_zp is not None:
        xc = relax.op.subtract(xc, relax.op.astype(x_zp, dtype))
    xc = bb.normalize(xc)
    if wc is not None:
        weight = relax.const(wc.astype(np.float32 if exact_f32 else np.int32))
    else:
        weight = relax.op.astype(w, "int32")
        if w_zp is not None:
            zp = bb.normalize(relax.op.astype(w_zp, "int32"))
            weight = relax.op.subtract(weight, relax.op.reshape(zp, [-1, 1, 1, 1]) if len(zp.ty.shape) == 1 else zp)
        weight = bb.normalize(weight)
    kernel_shape = attr.get("kernel_shape") or [int(d) for d in w.ty.shape.values[2:]]
    strides, dilations = attr.get("strides", [1, 1]), attr.get("dilations", [1, 1])
    pads = attr.get("pads", [0, 0, 0, 0])
    auto_pad = attr.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode("utf-8") if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # the centred input: padding it with 0 pads x with x_zp
        xc = autopad(bb, xc, strides, kernel_shape, dilations, mode=auto_pad, deconv=False)
        pads = [0, 0, 0, 0]
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    elif auto_pad != "NOTSET":
        raise ValueError(f"ConvInteger: auto_pad {auto_pad!r} is not a valid value")
    y = relax.op.nn.conv2d(xc, weight, strides=strides, padding=pads, dilation=dilations,
                           groups=attr.get("group", 1), data_layout="NCHW", kernel_layout="OIHW",
                           out_dtype=dtype)
    return relax.op.astype(y, "int32") if exact_f32 else y


def _constant(expr: Any) -> np.ndarray | None:
    """The value of a Relax constant (TVM 0.27: ``ir.GenericConst``), None for anything else."""
    import tvm

    if isinstance(expr, tvm.ir.expr.GenericConst) and hasattr(expr.value, "numpy"):
        return np.asarray(expr.value.numpy())
    return None


def edgec_converters() -> dict[str, Any]:
    """The converters edgec adds to TVM's ONNX frontend, as its converter classes (op name -> class)."""
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class ConvInteger(OnnxOpConverter):
        @classmethod
        def _impl_v10(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            return conv_integer(bb, list(inputs), attr)

    return {"ConvInteger": ConvInteger}


def onnx_converters() -> dict[str, Any]:
    """Every ONNX op the import converts: TVM's frontend's and edgec's."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return {**_get_convert_map(), **edgec_converters()}


@contextlib.contextmanager
def _with_edgec_converters() -> Iterator[None]:
    """TVM's frontend reads its converter table from ``_get_convert_map()`` on every import: for this import, that
    table has edgec's converters too (restored after)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), **edgec_converters()}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def import_onnx(model: onnx.ModelProto, batch: int = 1) -> Any:
    """The model as a Relax module with its dynamic batch pinned to ``batch`` (edge builds are static)."""
    from tvm.relax.frontend.onnx import from_onnx

    pinned = fix_batch(model, batch)
    if pinned != model or any(n.op_type == "Shape" for n in pinned.graph.node):
        # An export that computes shapes at run time (Shape -> Gather -> Concat -> Reshape, or the Slice bounds of
        # a chunked projection) gives TVM's importer PrimValues and unknown-shape tensors its Reshape and
        # constant folding reject (spiking nets; a transformer's q/k/v chunk). With the batch pinned, constant
        # folding with shape inference makes those shapes static constants.
        pinned = cleanup(pinned, CleanupConfig()).model
    model = pinned
    shapes = {s.name: list(s.shape) for s in input_specs(model)}
    dtypes = {s.name: s.dtype for s in input_specs(model)}
    try:
        with _with_edgec_converters():
            return from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    except Exception as e:  # noqa: BLE001 -- the frontend raises bare exceptions for unsupported ops
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise UsageError(f"TVM's ONNX importer rejected the model: {first}; try --target ort") from None
