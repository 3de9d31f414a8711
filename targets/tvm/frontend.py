"""TVM's side of the door: importing the SDK, the LLVM target of a profile, and the ONNX importer."""

from __future__ import annotations

from typing import Any

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


def import_onnx(model: onnx.ModelProto, batch: int = 1) -> Any:
    """The model as a Relax module with its dynamic batch pinned to ``batch`` (edge builds are static)."""
    from tvm.relax.frontend.onnx import from_onnx

    pinned = fix_batch(model, batch)
    if pinned != model:
        # A dynamic-batch export computes shapes at run time (Shape -> Gather -> Concat -> Reshape), which
        # TVM's importer turns into PrimValues its Reshape rejects (spiking nets). With the batch pinned,
        # constant folding makes those shapes static, as a static-batch export would have them.
        pinned = cleanup(pinned, CleanupConfig()).model
    model = pinned
    shapes = {s.name: list(s.shape) for s in input_specs(model)}
    dtypes = {s.name: s.dtype for s in input_specs(model)}
    try:
        return from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    except Exception as e:  # noqa: BLE001 -- the frontend raises bare exceptions for unsupported ops
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise UsageError(f"TVM's ONNX importer rejected the model: {first}; try --target ort") from None
