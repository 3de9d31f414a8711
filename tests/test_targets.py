"""Target conformance on user ONNX models: both CPU targets agree with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from targets import get_target
from tests.models import small_cnn, small_mlp
from toolchain import api
from toolchain.cache import Cache
from toolchain.errors import SdkMissing, UsageError
from toolchain.export import import_onnx_file, run_ort
from toolchain.profile import load_profile


@pytest.mark.parametrize("make", [small_cnn, small_mlp], ids=["cnn", "mlp"])
@pytest.mark.parametrize("target", ["ort", "tvm"])
def test_compiled_matches_onnxruntime(tmp_path: Path, cache: Cache, make, target: str) -> None:
    f = tmp_path / "user.onnx"
    onnx.save_model(make(), f)
    art, _ = import_onnx_file(f, cache)
    prof = load_profile("x86-avx512")
    out, hit = api.compile(art, prof, target, cache)
    assert not hit
    shape = (1, 1, 28, 28) if make is small_cnn else (1, 784)
    xs = np.random.default_rng(1).standard_normal((8, *shape)).astype(np.float32)
    ref = run_ort(f, [{"x": x} for x in xs])
    with get_target(target).load(out) as runner:
        for x, r in zip(xs, ref, strict=True):
            got = runner.infer({"x": x})[0]
            rel = np.abs(got - r[0]).max() / np.abs(r[0]).max()
            assert rel <= 1e-4
    assert api.compile(art, prof, target, cache)[1], "second compile must be a cache hit"


def test_tvm_records_kernels_and_triple(tmp_path: Path, cache: Cache) -> None:
    f = tmp_path / "m.onnx"
    onnx.save_model(small_mlp(), f)
    art, _ = import_onnx_file(f, cache)
    out, _ = api.compile(art, load_profile("x86-avx512"), "tvm", cache)
    assert out.meta["triple"] == "x86_64-linux-gnu" and out.meta["elf_machine"] == "x86_64"
    assert out.meta["kernels"] and all(k["origin"] in ("generic", "tuned", "hand-written") for k in out.meta["kernels"])


def test_coverage_reports_unsupported_ops() -> None:
    m = small_mlp()
    m.graph.node.append(onnx.helper.make_node("FrobnicateOp", ["y"], ["z"], domain="com.example"))
    prof = load_profile("x86-avx512")
    for t in ("ort", "tvm"):
        cov = get_target(t).supports(m, prof)
        assert not cov.complete and "FrobnicateOp" in cov.unsupported
        assert cov.supported_ops.get("MatMul") == 2


def test_tensorrt_says_what_it_needs(tmp_path: Path, cache: Cache) -> None:
    trt = get_target("tensorrt")
    reason = trt.available()
    if reason is None:
        pytest.skip("an NVIDIA GPU with TensorRT is present: covered by the gpu tier")
    assert "NVIDIA GPU" in reason and "tensorrt" in reason
    f = tmp_path / "m.onnx"
    onnx.save_model(small_mlp(), f)
    art, _ = import_onnx_file(f, cache)
    with pytest.raises(SdkMissing, match="NVIDIA GPU"):
        api.compile(art, load_profile("jetson-orin-nano"), "tensorrt", cache)


def test_target_not_in_profile(tmp_path: Path, cache: Cache) -> None:
    f = tmp_path / "m.onnx"
    onnx.save_model(small_mlp(), f)
    art, _ = import_onnx_file(f, cache)
    with pytest.raises(UsageError, match="does not list target 'tensorrt'"):
        api.compile(art, load_profile("x86-avx512"), "tensorrt", cache)
