"""TensorRT on 10 and 11: what keys an engine and its timing cache, and the ONNX a remote bench sends instead of
a host-built engine (run here); strongly typed builds of edgec's fp16 and int8 (symmetric Q/DQ) models (marked
gpu: this machine has no NVIDIA GPU, never run here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from targets.base import CompileOptions
from targets.tensorrt import TensorRTTarget, engine_config, timing_cache_path
from tests.fixtures.device_models import fit_linear, save
from toolchain import api
from toolchain.bench import prepare_job, remote_job
from toolchain.core.cache import Cache, StepKey
from toolchain.core.errors import SdkMissing, UsageError
from toolchain.core.profile import load_profile
from toolchain.device.protocol import KIND_FUNCS
from toolchain.export import import_onnx_file
from toolchain.search import variants_for

JETSON = load_profile("jetson-orin-nano")


def test_engines_and_timing_caches_are_keyed_by_tensorrt_version_and_gpu(tmp_path: Path) -> None:
    a = engine_config(JETSON, "10.3.0", "Orin (nvgpu)")
    assert a["strongly_typed"] is True and "fp16" not in a  # precision comes from the ONNX, not builder flags
    assert a["workspace_bytes"] == 8192 * 1024 * 1024 // 4  # a quarter of the profile's GPU memory
    assert engine_config(JETSON, "11.0.0", "Orin (nvgpu)") != a
    assert engine_config(JETSON, "10.3.0", "NVIDIA H200") != a
    paths = {timing_cache_path(tmp_path, engine_config(JETSON, v, g))
             for v in ("10.3.0", "11.0.0") for g in ("Orin (nvgpu)", "NVIDIA H200")}
    assert len(paths) == 4 and all(p.parent == tmp_path / "tensorrt" / "timing" for p in paths)
    assert timing_cache_path(tmp_path, a).name == "trt10.3.0-orin-nvgpu-sm87.cache"


def test_tensorrt_before_10_is_refused() -> None:
    with pytest.raises(SdkMissing, match="strongly typed"):
        engine_config(JETSON, "8.6.1", "Orin (nvgpu)")


def test_a_remote_tensorrt_bench_sends_the_onnx_with_the_profiles_build_settings(tmp_path: Path,
                                                                                  fashion: object) -> None:
    cache = Cache(tmp_path / "cache")
    src, _ = import_onnx_file(save(fit_linear(fashion), tmp_path / "lin.onnx"), cache)

    def write(d: Path) -> tuple[str, dict[str, object]]:  # stands for a host-built engine: TensorRT cannot build
        (d / "model.engine").write_bytes(b"host-built engine")  # here, and a remote bench never sends it
        return "model.engine", {"source": src.key}

    eng, _ = cache.get_or_build(StepKey("compile:tensorrt", (src.key,), {}, 1, JETSON.id), "trt-engine", write)
    job = prepare_job(eng, cache, profile=JETSON, data="fashion-mnist", samples=50, duration_s=0.1)
    sent = remote_job(job)
    assert sent.art.kind == "trt-onnx" and sent.art.kind in KIND_FUNCS and sent.target == "tensorrt"
    assert sent.art.payload.read_bytes() == src.payload.read_bytes()  # the ONNX itself, unchanged
    assert sent.art.meta["runner_options"] == {"workspace_bytes": 8192 * 1024 * 1024 // 4, "sparse": True}
    assert sent.art.meta["source"] == src.key and cache.verify(sent.art)
    np.testing.assert_array_equal(sent.ref_out, job.ref_out)  # judged against the same reference
    assert sent.art == TensorRTTarget().device_artifact(src, JETSON, cache)[0]  # cached: built once
    plain = api.compile(src, profile=load_profile("x86-avx512"), target="ort", cache=cache)[0]
    ort_job = prepare_job(plain, cache, data="fashion-mnist", samples=10, duration_s=0.1)
    assert remote_job(ort_job) is ort_job  # other kinds go as they are
    with pytest.raises(UsageError, match="ONNX artifact"):
        TensorRTTarget().device_artifact(eng, JETSON, cache)


def test_a_host_without_tensorrt_compiles_for_a_jetson_that_builds_its_engine(tmp_path: Path, fashion: object) -> None:
    """The Jetson builds its engine with JetPack's TensorRT: a host with neither TensorRT nor a GPU compiles the
    artifact it sends (``--for-device``), and the device-side variants of pick / --optimize fastest include it."""
    if TensorRTTarget().available() is None:
        pytest.skip("this machine can build TensorRT engines itself")
    cache = Cache(tmp_path / "cache")
    model = save(fit_linear(fashion), tmp_path / "lin.onnx")
    src, _ = import_onnx_file(model, cache)
    with pytest.raises(SdkMissing):  # an engine for this host: needs TensorRT here
        api.compile(src, profile=JETSON, target="tensorrt", cache=cache)
    art, _ = api.compile(src, profile=JETSON, target="tensorrt", cache=cache, options=CompileOptions(for_device=True))
    assert art.kind == "trt-onnx" and art == TensorRTTarget().device_artifact(src, JETSON, cache)[0]
    r = CliRunner().invoke(app, ["--cache-dir", str(tmp_path / "cache"), "compile", str(model), "--profile",
                                 JETSON.id, "--target", "tensorrt", "--for-device", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["artifact"] == art.key
    assert not any(v.target == "tensorrt" for v in variants_for(JETSON, runs_here=True))
    assert any(v.target == "tensorrt" for v in variants_for(JETSON, on_device=True))


@pytest.mark.gpu  # needs an NVIDIA GPU and the tensorrt package: never run on this CPU-only machine
@pytest.mark.parametrize("passes", [["fp16"], ["int8=mode=static"]])
def test_strongly_typed_engine_from_edgecs_precision_passes(passes: list[str], tmp_path: Path,
                                                            fashion: object) -> None:
    cache = Cache(tmp_path / "cache")
    src, _ = import_onnx_file(save(fit_linear(fashion, hidden=64), tmp_path / "m.onnx"), cache)
    opt, _ = api.optimize(src, passes, cache=cache, profile=JETSON, target="tensorrt", data="fashion-mnist")
    art, hit = api.compile(opt, profile=JETSON, target="tensorrt", cache=cache)
    assert not hit and art.meta["strongly_typed"] and Path(art.meta["timing_cache"]).stat().st_size > 0
    from targets.tensorrt import TensorRTRunner

    out = TensorRTRunner(art.payload).infer({"x": fashion.x_test[:1]})[0]  # type: ignore[attr-defined]
    assert out.shape == (1, 10) and np.isfinite(out).all()
