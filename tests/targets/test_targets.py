"""Target conformance on user ONNX models: both CPU targets agree with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from targets import get_target
from tests.fixtures.models import small_cnn, small_mlp
from toolchain import api
from toolchain.core.cache import Cache
from toolchain.core.errors import SdkMissing, UsageError
from toolchain.core.profile import load_profile
from toolchain.export import import_onnx_file, run_ort


@pytest.mark.parametrize("make", [small_cnn, small_mlp], ids=["cnn", "mlp"])
@pytest.mark.parametrize("target", ["ort", "tvm"])
def test_compiled_matches_onnxruntime(tmp_path: Path, cache: Cache, make, target: str) -> None:
    f = tmp_path / "user.onnx"
    onnx.save_model(make(), f)
    art, _ = import_onnx_file(f, cache)
    prof = load_profile("x86-avx512")
    out, hit = api.compile(art, profile=prof, target=target, cache=cache)
    assert not hit
    shape = (1, 1, 28, 28) if make is small_cnn else (1, 784)
    xs = np.random.default_rng(1).standard_normal((8, *shape)).astype(np.float32)
    ref = run_ort(f, [{"x": x} for x in xs])
    with get_target(target).load(out) as runner:
        for x, r in zip(xs, ref, strict=True):
            got = runner.infer({"x": x})[0]
            rel = np.abs(got - r[0]).max() / np.abs(r[0]).max()
            assert rel <= 1e-4
    assert api.compile(art, profile=prof, target=target, cache=cache)[1], "second compile must be a cache hit"


def test_tvm_records_kernels_and_triple(tmp_path: Path, cache: Cache) -> None:
    f = tmp_path / "m.onnx"
    onnx.save_model(small_mlp(), f)
    art, _ = import_onnx_file(f, cache)
    out, _ = api.compile(art, profile=load_profile("x86-avx512"), target="tvm", cache=cache)
    assert out.meta["triple"] == "x86_64-linux-gnu" and out.meta["elf_machine"] == "x86_64"
    assert out.meta["kernels"]
    assert all(k["origin"] in ("generic", "tuned", "hand-written", "rule") for k in out.meta["kernels"])


def test_tvm_runner_reads_current_input_and_returns_fresh_outputs(tmp_path: Path, cache: Cache) -> None:
    """The runner's per-call shortcuts (staging copy, main pre-bound to the staging tensors) must keep
    ONNX Runtime's semantics: every call reads the caller's input as it is now and returns new arrays."""
    f = tmp_path / "m.onnx"
    onnx.save_model(small_mlp(), f)
    art, _ = import_onnx_file(f, cache)
    out, _ = api.compile(art, profile=load_profile("x86-avx512"), target="tvm", cache=cache)
    x = np.random.default_rng(2).standard_normal((1, 784)).astype(np.float32)
    with get_target("tvm").load(out) as runner:
        a = runner.infer({"x": x})[0]
        a_copy = a.copy()
        x *= -2.0  # the same array, changed in place
        b = runner.infer({"x": x})[0]
        assert not np.shares_memory(a, b)
        np.testing.assert_array_equal(a, a_copy)  # the second call did not overwrite the first result
        assert not np.allclose(a, b)
        b[...] = 0.0  # a caller scribbling on a result must not affect the next call
        c = runner.infer({"x": np.asfortranarray(x)})[0]
        np.testing.assert_allclose(c, run_ort(f, [{"x": x}])[0][0], rtol=1e-4, atol=1e-5)


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
        api.compile(art, profile=load_profile("jetson-orin-nano"), target="tensorrt", cache=cache)


def test_target_not_in_profile(tmp_path: Path, cache: Cache) -> None:
    f = tmp_path / "m.onnx"
    onnx.save_model(small_mlp(), f)
    art, _ = import_onnx_file(f, cache)
    with pytest.raises(UsageError, match="does not list target 'tensorrt'"):
        api.compile(art, profile=load_profile("x86-avx512"), target="tensorrt", cache=cache)
