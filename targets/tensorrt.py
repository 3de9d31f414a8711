"""TensorRT target (NVIDIA GPUs, Jetson): TensorRT 10 (Jetson Orin on JetPack 6) and 11 (the registry's).

Networks are built strongly typed on both (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT 11 has no
other kind and no FP16/INT8 builder flags): precision comes from the ONNX itself, i.e. edgec's fp16 pass (casts)
and int8 pass (Q/DQ, symmetric with zero-point 0 for this target). Engines are specific to the TensorRT version
and the GPU: both key the engine, and the builder's timing cache persists per (TensorRT version, GPU) under
the cache's ``tensorrt/timing`` folder. The building itself is ``toolchain.device.tensorrt_engine``, the one
implementation the device runtime uses too.

Two artifacts: ``compile`` builds an engine here ("trt-engine"; needs TensorRT and a GPU on this machine);
``device_artifact`` is the ONNX with the profile's build settings ("trt-onnx"; needs nothing here), which a
remote device builds into its own engine and caches (a Jetson's engine must come from JetPack's TensorRT on that
Jetson). A bench on a remote device sends the "trt-onnx" one (``toolchain.bench.RpcFarm``).

This machine has no NVIDIA GPU, so ``available()`` explains why the target cannot run and every
entry point that needs TensorRT raises SdkMissing (exit code 3) with the fix. The import is lazy so ``import
targets`` works without the SDK; the tests that need it are marked ``gpu``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx

from targets.base import CompileOptions, Coverage
from toolchain.core.cache import Artifact, Cache, StepKey
from toolchain.core.errors import SdkMissing, UsageError
from toolchain.core.profile import Profile
from toolchain.device.runners import TrtOnnxRunner
from toolchain.device.tensorrt_engine import (
    EngineRunner,
    EngineSpec,
    build_engine,
    check_tensorrt_version,
    gpu_identity,
    gpu_name,
    import_tensorrt,
    strongly_typed_network,
    timing_cache_path,
    workspace_for_memory,
)

__all__ = ["TensorRTRunner", "TensorRTTarget", "device_build_options", "engine_config", "gpu_name",
           "strongly_typed_network", "timing_cache_path"]


class TensorRTRunner(EngineRunner):
    """A "trt-engine" payload (built by ``compile``) on this machine's GPU."""

    def __init__(self, engine_path: Path) -> None:
        super().__init__(import_tensorrt(), Path(engine_path).read_bytes())


def device_build_options(profile: Profile) -> dict[str, Any]:
    """What the profile decides about an engine beyond the TensorRT version and the GPU: the builder's workspace
    (a quarter of the profile's GPU memory) and sparse weights (where the GPU has sparse tensor cores)."""
    spec = profile.gpu
    if spec is None:
        raise SdkMissing(f"profile {profile.id} has no [gpu] table; the tensorrt target needs one")
    return {"workspace_bytes": workspace_for_memory(spec.memory_mb * 1024 * 1024),
            "sparse": bool(spec.sparse_tensor_cores)}


def engine_config(profile: Profile, trt_version: str, gpu: str | None = None, sm: int | None = None
                  ) -> dict[str, Any]:
    """What keys an engine: engines are specific to the GPU (its name and compute capability, the profile's
    unless measured) and the TensorRT version; networks are strongly typed; the builder's workspace is bounded
    by the profile's GPU memory (a quarter of it)."""
    opts = device_build_options(profile)
    check_tensorrt_version(trt_version)
    assert profile.gpu is not None  # device_build_options refused a profile without one
    return EngineSpec(trt_version, gpu or profile.gpu.name, sm if sm is not None else profile.gpu.sm,
                      opts["workspace_bytes"], opts["sparse"]).to_json()


class TensorRTTarget:
    name = "tensorrt"

    def available(self) -> str | None:
        try:
            import_tensorrt()
        except SdkMissing as e:
            return str(e)
        return None

    def supports(self, model: onnx.ModelProto, profile: Profile) -> Coverage:
        reason = self.available()
        if reason is not None:
            ops = {n.op_type for n in model.graph.node}
            return Coverage(self.name, {}, {op: reason for op in ops})
        trt = import_tensorrt()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = strongly_typed_network(trt, builder)
        parser = trt.OnnxParser(network, logger)
        ok = parser.supports_model_v2(model.SerializeToString())
        unsup: dict[str, str] = {}
        if not ok:
            for i in range(parser.num_subgraphs):
                if not parser.is_subgraph_supported(i):
                    for node_idx in parser.get_subgraph_nodes(i):
                        unsup[model.graph.node[node_idx].op_type] = "TensorRT's ONNX parser rejects it"
        sup: dict[str, int] = {}
        for n in model.graph.node:
            if n.op_type not in unsup:
                sup[n.op_type] = sup.get(n.op_type, 0) + 1
        return Coverage(self.name, sup, unsup)

    def compile(self, art: Artifact, profile: Profile, cache: Cache,
                options: CompileOptions = CompileOptions()) -> tuple[Artifact, bool]:
        """An engine built here, for this machine's GPU ("trt-engine")."""
        trt = import_tensorrt()
        gpu, sm = gpu_identity()  # the GPU here, measured: not the profile's
        cfg = engine_config(profile, str(trt.__version__), gpu, sm)
        spec = EngineSpec(**cfg)
        timing = timing_cache_path(cache.root, spec)

        def write(d: Path) -> tuple[str, dict[str, Any]]:
            (d / "model.engine").write_bytes(build_engine(trt, art.payload.read_bytes(), spec, timing))
            return "model.engine", {"source": art.key, **cfg, "timing_cache": str(timing)}

        sk = StepKey("compile:tensorrt", (art.key,), cfg, 3, profile.id)
        return cache.get_or_build(sk, "trt-engine", write)

    def device_artifact(self, art: Artifact, profile: Profile, cache: Cache) -> tuple[Artifact, bool]:
        """The ONNX a remote device builds its own engine from ("trt-onnx"): the payload is ``art``'s ONNX
        unchanged, the profile's build settings travel as runner options. Needs no TensorRT here."""
        if art.kind != "onnx":
            raise UsageError(f"device_artifact takes an ONNX artifact, got a {art.kind!r}")
        opts = device_build_options(profile)

        def write(d: Path) -> tuple[str, dict[str, Any]]:
            shutil.copyfile(art.payload, d / "model.onnx")
            assert profile.gpu is not None  # device_build_options refused a profile without one
            return "model.onnx", {"source": art.key, "runner_options": opts, "strongly_typed": True,
                                  "builds_on": "device", "profile_gpu": profile.gpu.name, "sm": profile.gpu.sm}

        sk = StepKey("device-artifact:tensorrt", (art.key,), opts, 1, profile.id)
        return cache.get_or_build(sk, "trt-onnx", write)

    def load(self, art: Artifact) -> EngineRunner:
        if art.kind == "trt-onnx":  # built into an engine here, through the engine cache, as a device does
            return TrtOnnxRunner(art.payload, [], 1, **art.meta.get("runner_options", {}))
        return TensorRTRunner(art.payload)

    def kernels(self, art: Artifact) -> list[dict[str, Any]]:
        return [{"name": "engine", "origin": "vendor", "ops": []}]
