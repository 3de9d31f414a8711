"""TensorRT engines built on the device (``toolchain.device.tensorrt_engine``, runner kind "trt-onnx").

Runs here (no TensorRT, no NVIDIA GPU): the engine cache key, the digest check that refuses a truncated or altered
engine before anything could deserialize it, the runner kind not offered without TensorRT, and a real remote
bench of a TensorRT job whose host ships the ONNX to a real lean device on loopback (which, without TensorRT,
refuses the kind by name). Marked ``gpu`` (never run on this CPU-only machine; they need an NVIDIA GPU, the
tensorrt package and libcuda): the engine built from the ONNX, cached, reused, rebuilt after tampering, and
benched through the lean runtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from targets.tensorrt import TensorRTTarget
from tests.fixtures.device_farm import TOKEN, start_tracker
from tests.fixtures.device_models import fit_linear, save
from toolchain.bench import RpcFarm, prepare_job
from toolchain.core.cache import Cache, StepKey
from toolchain.core.errors import SdkMissing, UsageError
from toolchain.core.profile import load_profile
from toolchain.device.protocol import KIND_FUNCS, RemoteSpec
from toolchain.device.runners import TrtOnnxRunner
from toolchain.device.runtime import available_runners
from toolchain.device.tensorrt_engine import (
    CACHE_ENV,
    EngineSpec,
    digest_path,
    engine_cache_path,
    engine_key,
    gpu_visible,
    load_or_build_engine,
    read_verified,
    timing_cache_path,
    write_verified,
)
from toolchain.export import import_onnx_file

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
GPU_SKIP = pytest.mark.skipif(not (HAS_TENSORRT and gpu_visible()),
                              reason="needs an NVIDIA GPU and the tensorrt package (this machine has neither)")
ORIN = EngineSpec("10.3.0", "Orin (nvgpu)", 87, 2 << 30, sparse=True)
ONNX_SHA = hashlib.sha256(b"an onnx model").hexdigest()


def test_engine_key_covers_onnx_tensorrt_gpu_sm_workspace_and_typing(tmp_path: Path) -> None:
    key = engine_key(ONNX_SHA, ORIN)
    assert key == engine_key(ONNX_SHA, EngineSpec("10.3.0", "Orin (nvgpu)", 87, 2 << 30, sparse=True))
    variants = [
        engine_key(hashlib.sha256(b"another model").hexdigest(), ORIN),
        engine_key(ONNX_SHA, EngineSpec("11.0.0", "Orin (nvgpu)", 87, 2 << 30, sparse=True)),
        engine_key(ONNX_SHA, EngineSpec("10.3.0", "NVIDIA H200", 87, 2 << 30, sparse=True)),
        engine_key(ONNX_SHA, EngineSpec("10.3.0", "Orin (nvgpu)", 90, 2 << 30, sparse=True)),
        engine_key(ONNX_SHA, EngineSpec("10.3.0", "Orin (nvgpu)", 87, 1 << 30, sparse=True)),
        engine_key(ONNX_SHA, EngineSpec("10.3.0", "Orin (nvgpu)", 87, 2 << 30, sparse=False)),
        engine_key(ONNX_SHA, EngineSpec("10.3.0", "Orin (nvgpu)", 87, 2 << 30, sparse=True, strongly_typed=False)),
    ]
    assert len({key, *variants}) == 1 + len(variants)
    with pytest.raises(UsageError, match="sha256"):
        engine_key("../../etc/passwd", ORIN)  # the key names a file: only a digest goes into it
    path = engine_cache_path(tmp_path, b"an onnx model", ORIN)
    assert path == tmp_path / "tensorrt" / "engines" / f"{key}.engine"
    assert timing_cache_path(tmp_path, ORIN).name == "trt10.3.0-orin-nvgpu-sm87.cache"


def test_a_tampered_or_truncated_engine_is_refused_before_deserializing(tmp_path: Path) -> None:
    path = engine_cache_path(tmp_path, b"an onnx model", ORIN)
    engine = os.urandom(4096)  # plain bytes: what matters is that altered ones never come back
    write_verified(path, engine)
    assert read_verified(path) == engine
    assert (path.parent.stat().st_mode & 0o777) == 0o700 and (path.stat().st_mode & 0o777) == 0o600

    altered = bytearray(engine)
    altered[100] ^= 0x01
    path.write_bytes(bytes(altered))
    assert read_verified(path) is None
    assert not path.exists() and not digest_path(path).exists()  # removed: the next load rebuilds it

    write_verified(path, engine)
    path.write_bytes(engine[:1000])  # truncated
    assert read_verified(path) is None and not path.exists()

    write_verified(path, engine)
    digest_path(path).unlink()  # no digest: not trusted either
    assert read_verified(path) is None and not path.exists()

    elsewhere = tmp_path / "elsewhere.engine"
    write_verified(elsewhere, engine)
    write_verified(path, engine)
    path.unlink()
    path.symlink_to(elsewhere)  # a link, even to a verified engine, is not read
    assert read_verified(path) is None and not path.is_symlink() and elsewhere.is_file()


def test_the_engine_cache_returns_a_verified_engine_and_rebuilds_a_tampered_one(tmp_path: Path) -> None:
    """``trt=None``: any build attempt fails, so a returned engine proves a cache hit, and a failure proves the
    tampered engine was not used."""
    onnx_bytes = b"an onnx model"
    engine = os.urandom(2048)
    write_verified(engine_cache_path(tmp_path, onnx_bytes, ORIN), engine)
    assert load_or_build_engine(None, onnx_bytes, ORIN, tmp_path) == (engine, False)
    other = EngineSpec("10.3.0", "Orin (nvgpu)", 87, 1 << 30, sparse=True)  # another workspace: another engine
    with pytest.raises(AttributeError):  # None has no Logger: it went on to build
        load_or_build_engine(None, onnx_bytes, other, tmp_path)
    path = engine_cache_path(tmp_path, onnx_bytes, ORIN)
    path.write_bytes(engine[:-1] + bytes([engine[-1] ^ 0xFF]))
    with pytest.raises(AttributeError):
        load_or_build_engine(None, onnx_bytes, ORIN, tmp_path)
    assert not path.exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here: the kind is offered where a GPU is visible")
def test_trt_onnx_is_not_offered_without_tensorrt(tmp_path: Path) -> None:
    assert KIND_FUNCS["trt-onnx"] == "edgec.trt_onnx_bench"
    runners = available_runners()
    assert "trt-onnx" not in runners and "tvm-lib" in runners
    with pytest.raises(SdkMissing, match="tensorrt is not installed"):
        TrtOnnxRunner(tmp_path / "model.onnx", ["x"], 1)


def engine_job(tmp_path: Path, fashion: object) -> tuple[Cache, Any, Any]:
    """A "trt-engine" cache entry built from a real ONNX (its payload stands for an engine: TensorRT cannot build
    one here, and a remote bench never sends it) and its bench job for the Jetson profile."""
    cache = Cache(tmp_path / "cache")
    src, _ = import_onnx_file(save(fit_linear(fashion), tmp_path / "lin.onnx"), cache)
    jetson = load_profile("jetson-orin-nano")

    def write(d: Path) -> tuple[str, dict[str, Any]]:
        (d / "model.engine").write_bytes(b"host-built engine, never sent")
        return "model.engine", {"source": src.key}

    eng, _ = cache.get_or_build(StepKey("compile:tensorrt", (src.key,), {"test": True}, 1, jetson.id), "trt-engine",
                                write)
    job = prepare_job(eng, cache, profile=jetson, data="fashion-mnist", samples=50, duration_s=0.1)
    return cache, src, job


@pytest.mark.rpc
@pytest.mark.slow  # about 16 s: a tracker and a lean device start
def test_a_remote_tensorrt_bench_sends_the_onnx_and_a_device_without_tensorrt_refuses_it(
        tmp_path: Path, fashion: object) -> None:
    cache, src, job = engine_job(tmp_path, fashion)
    log = tmp_path / "device-calls.jsonl"
    farm = start_tracker("edgec-trt", log_dir=tmp_path)
    try:
        farm.add_device(lean=True, log=log)
        farm.wait_devices(1)
        spec = RemoteSpec("127.0.0.1", farm.tracker_port, "edgec-trt", TOKEN, request_timeout_s=60)
        with pytest.raises(UsageError, match="cannot run 'trt-onnx' artifacts"):
            RpcFarm(spec).run([job])
    finally:
        farm.close()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    uploads = [c["file"] for c in calls if c["call"] == "upload"]
    assert len(uploads) == 1 and uploads[0].endswith("-model.onnx"), calls  # the ONNX went, not the engine
    assert uploads[0].startswith(TensorRTTarget().device_artifact(src, load_profile("jetson-orin-nano"),
                                                                  cache)[0].key[:16])


# -- with TensorRT and a GPU (never run here) --------------------------------------------------------------------


@pytest.mark.gpu
@GPU_SKIP
def test_the_device_builds_caches_and_reuses_its_engine(tmp_path: Path, fashion: object,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "device-cache"))
    model = save(fit_linear(fashion), tmp_path / "lin.onnx")
    x = fashion.x_test[:1].reshape(1, 784).astype(np.float32)  # type: ignore[attr-defined]
    with TrtOnnxRunner(model, ["x"], 1, workspace_bytes=256 << 20) as first:
        assert first.built and first.spec.workspace_bytes == 256 << 20 and first.spec.sm >= 50
        out = first.infer({"x": x})[0]
    assert out.shape == (1, 10) and np.isfinite(out).all()
    path = engine_cache_path(tmp_path / "device-cache", model.read_bytes(), first.spec)
    assert read_verified(path) is not None
    assert timing_cache_path(tmp_path / "device-cache", first.spec).stat().st_size > 0
    with TrtOnnxRunner(model, ["x"], 1, workspace_bytes=256 << 20) as again:
        assert not again.built
        np.testing.assert_allclose(again.infer({"x": x})[0], out, rtol=1e-5, atol=1e-5)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # tampered: rebuilt, never deserialized
    with TrtOnnxRunner(model, ["x"], 1, workspace_bytes=256 << 20) as rebuilt:
        assert rebuilt.built
        np.testing.assert_allclose(rebuilt.infer({"x": x})[0], out, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="workspace_bytes"):
        TrtOnnxRunner(model, ["x"], 1, workspace_bytes=1 << 60)


@pytest.mark.gpu
@pytest.mark.rpc
@GPU_SKIP
def test_remote_tensorrt_bench_builds_on_the_device(tmp_path: Path, fashion: object) -> None:
    cache = Cache(tmp_path / "cache")
    jetson = load_profile("jetson-orin-nano")
    src, _ = import_onnx_file(save(fit_linear(fashion), tmp_path / "lin.onnx"), cache)
    sent, _ = TensorRTTarget().device_artifact(src, jetson, cache)
    job = prepare_job(sent, cache, profile=jetson, data="fashion-mnist", samples=200, duration_s=0.2)
    farm = start_tracker("edgec-trt-gpu", log_dir=tmp_path)
    try:
        farm.add_device(lean=True, env={CACHE_ENV: str(tmp_path / "device-cache")})
        farm.wait_devices(1)
        spec = RemoteSpec("127.0.0.1", farm.tracker_port, "edgec-trt-gpu", TOKEN, request_timeout_s=120)
        res = RpcFarm(spec).run([job])[sent.key]
    finally:
        farm.close()
    assert res["kind"] == "trt-onnx" and res["agreement"]["argmax_agreement"] >= 0.99
    assert res["accuracy"]["task_accuracy"] > 0.7
    assert list((tmp_path / "device-cache" / "tensorrt" / "engines").glob("*.engine"))
