"""The int8 pass for the tensorrt target: Q/DQ with int8 activations and weights and zero-point 0 everywhere
(TensorRT's strongly typed networks take only that form), calibrated on real Fashion-MNIST; ONNX Runtime runs it
and agrees with the fp32 model's argmax. The ort target keeps uint8 activations with calibrated zero points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.fixtures.device_models import fit_linear
from toolchain.core.cache import Cache
from toolchain.core.errors import UsageError
from toolchain.core.onnx_io import ort_session
from toolchain.core.profile import load_profile
from toolchain.passes import PassContext
from toolchain.passes.int8 import Config, run
from toolchain.zoo.datasets.base import Dataset


def zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]


def static(model: onnx.ModelProto, data: Dataset, target: str, tmp_path: Path) -> tuple[onnx.ModelProto, dict]:
    ctx = PassContext(profile=load_profile("jetson-orin-nano"), cache=Cache(tmp_path / "cache"), data=data,
                      target=target)
    res = run(model, Config(mode="static", calib_samples=128), ctx)
    return res.model, res.report


def test_tensorrt_int8_is_symmetric_with_zero_point_zero(fashion: Dataset, tmp_path: Path) -> None:
    model = fit_linear(fashion, hidden=64)
    trt, report = static(model, fashion, "tensorrt", tmp_path)
    zps = zero_points(trt)
    assert report["symmetric"] is True and len(zps) >= 4
    assert all(z.dtype == np.int8 and not z.any() for z in zps), [(z.dtype, z) for z in zps]
    ort_form, _ = static(model, fashion, "ort", tmp_path)
    assert any(z.dtype == np.uint8 for z in zero_points(ort_form))  # other targets keep asymmetric activations
    x = fashion.x_test[:500]
    q, f = ort_session(trt), ort_session(model)
    got = np.concatenate([q.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    want = np.concatenate([f.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert float((got.argmax(1) == want.argmax(1)).mean()) >= 0.97


def test_tensorrt_refuses_dynamic_int8(fashion: Dataset, tmp_path: Path) -> None:
    ctx = PassContext(profile=load_profile("jetson-orin-nano"), cache=Cache(tmp_path / "cache"), data=fashion,
                      target="tensorrt")
    with pytest.raises(UsageError, match="static"):
        run(fit_linear(fashion), Config(mode="dynamic"), ctx)
