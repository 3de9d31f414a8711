"""int8: INT8 quantization with ONNX Runtime's tooling, dynamic or static (QDQ, per-channel weights).

Only weight ops (MatMul / Gemm / Conv with a constant weight) are quantized; elementwise math (KAN basis
evaluation, spiking membrane / threshold) stays fp32. Static mode calibrates activation ranges on REAL
training inputs of the model's labelled dataset; the ranges are their own cached artifact. Reduced range
(7-bit) weights are used on CPUs without VNNI, where u8s8 products can saturate. For the tvm target the
static QDQ dense layers take the integer form (``MatMulInteger`` + a scale: int8 weights, integer products)
that edgec's TVM kernels run on the CPU's int8 dot products; for ONNX Runtime they stay QDQ (its own fusion).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from toolchain.core.errors import UsageError
from toolchain.passes import PassContext, PassResult
from toolchain.passes._graph import copy_model
from toolchain.passes._quant import (
    calibration_ranges,
    candidates,
    check_weight_ops,
    gemm_to_matmul,
    name_nodes,
    qdq_to_integer,
    require_data,
    weight_bits_report,
)


@dataclass(frozen=True)
class Config:
    mode: str = "dynamic"  # dynamic | static
    per_channel: bool = True
    calib_samples: int = 512
    calib_method: str = "minmax"  # minmax | entropy | percentile
    keep_fp32: tuple[str, ...] = ()  # node names to leave in fp32
    family_defaults: bool = True  # KAN basis / spiking threshold stay fp32

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static"):
            raise ValueError(f"mode must be dynamic or static, got {self.mode!r}")
        if self.calib_method not in ("minmax", "entropy", "percentile"):
            raise ValueError(f"calib_method must be minmax, entropy or percentile, got {self.calib_method!r}")

    @property
    def needs_data(self) -> bool:
        return self.mode == "static"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # ORT's quantizer logs a pre-processing hint on the root logger for every call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def reduce_range_for(ctx: PassContext) -> bool:
    prof = ctx.profile
    return bool(prof is not None and getattr(prof.cpu, "arch", "") == "x86_64"
                and prof.cpu.int8_dot != "vnni")


def prepare(model: onnx.ModelProto, mode: str, nodes: list[str]) -> onnx.ModelProto:
    m = name_nodes(copy_model(model))
    return gemm_to_matmul(m, nodes) if mode == "dynamic" else m


def quantize(model: onnx.ModelProto, mode: str, nodes: list[str], per_channel: bool, reduce_range: bool,
             calib: Path | None = None, calib_method: str = "minmax", symmetric: bool = False) -> onnx.ModelProto:
    """The model with exactly ``nodes`` quantized (``model`` already went through ``prepare``). ``symmetric``:
    int8 activations and weights with zero-point 0 (what TensorRT takes)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if not nodes:  # ORT reads an empty selection as "everything"
        return copy_model(model)
    with tempfile.TemporaryDirectory() as td, _quiet():
        src, dst = Path(td) / "in.onnx", Path(td) / "out.onnx"
        onnx.save_model(model, src)
        if mode == "dynamic":
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Conv"], per_channel=per_channel,
                             reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_quantize=nodes)
        else:
            meth = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[calib_method]
            quantize_static(src, dst, None, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gemm", "Conv"], per_channel=per_channel,
                            reduce_range=reduce_range,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=nodes, calibrate_method=meth,
                            calibration_cache_path=calib,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {})
        return onnx.load(str(dst))


def run(model: onnx.ModelProto, cfg: Config, ctx: PassContext | None = None) -> PassResult:
    ctx = ctx or PassContext()
    check_weight_ops(model, "int8")
    symmetric = ctx.target == "tensorrt"  # TensorRT takes Q/DQ int8 with zero-point 0 only
    if symmetric and cfg.mode != "static":
        raise UsageError("TensorRT takes static int8 (Q/DQ with zero-point 0): pass int8=mode=static")
    nodes, kept = candidates(name_nodes(copy_model(model)), cfg.family_defaults, cfg.keep_fp32)
    calib = None
    if cfg.mode == "static":
        require_data(ctx.data, "int8 (static)")
        calib = calibration_ranges(model, ctx.data, ctx.cache, cfg.calib_samples, cfg.calib_method)
    prep = prepare(model, cfg.mode, nodes)
    rr = reduce_range_for(ctx) and not symmetric
    out = quantize(prep, cfg.mode, nodes, cfg.per_channel, rr, calib, cfg.calib_method, symmetric)
    integer: list[str] = []
    if cfg.mode == "static" and ctx.target == "tvm":  # int8 weights and products on TVM, not folded fp32
        out, integer = qdq_to_integer(out)
    layers: list[dict[str, Any]] = [{"layer": n, "precision": "int8"} for n in nodes]
    layers += [{"layer": n, "precision": "fp32", "why": why} for n, why in kept.items()]
    report = {"mode": cfg.mode, "per_channel": cfg.per_channel, "reduce_range": rr, "symmetric": symmetric,
              "layers": layers,
              **({"integer_form": integer} if cfg.mode == "static" else {}),
              "weight_bytes": weight_bits_report(out)}
    if calib is not None:
        report["calibration"] = {"artifact": calib.parent.name, "samples": cfg.calib_samples,
                                 "method": cfg.calib_method}
    return PassResult(out, bool(nodes), report)
