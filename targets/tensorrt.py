"""TensorRT target (NVIDIA GPUs, Jetson): TensorRT 10 (Jetson Orin on JetPack 6) and 11 (the registry's).

Networks are built strongly typed on both (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT 11 has no
other kind and no FP16/INT8 builder flags): precision comes from the ONNX itself, i.e. edgec's fp16 pass (casts)
and int8 pass (Q/DQ, symmetric with zero-point 0 for this target). Engines are specific to the TensorRT version
and the GPU: both key the engine, and the builder's timing cache persists per (TensorRT version, GPU) under
the cache's ``tensorrt/timing`` folder. Never run here (no NVIDIA GPU): its tests are marked ``gpu``.

This machine has no NVIDIA GPU, so ``available()`` explains why the target cannot run and every
entry point raises SdkMissing (exit code 3) with the fix. The import is lazy so ``import targets``
works without the SDK.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from targets.base import CompileOptions, Coverage, SimpleRunner
from toolchain.core.cache import Artifact, Cache, StepKey
from toolchain.core.errors import SdkMissing
from toolchain.core.profile import Profile

NEEDS = "the tensorrt target needs an NVIDIA GPU and the tensorrt package (pip install edgec[tensorrt])"


def _import_trt():  # -> module
    try:
        import tensorrt as trt
    except ImportError:
        raise SdkMissing(f"{NEEDS}; tensorrt is not installed") from None
    if not _has_gpu():
        raise SdkMissing(f"{NEEDS}; no NVIDIA GPU is visible on this machine")
    return trt


def _has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl").exists()


class TensorRTRunner(SimpleRunner):
    def __init__(self, engine_path: Path) -> None:
        trt = _import_trt()
        import torch  # device buffers through torch's CUDA allocator

        self._torch = torch
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        stream = torch.cuda.current_stream()
        bufs = {}
        for n in self.input_names:
            bufs[n] = torch.from_numpy(np.ascontiguousarray(feed[n])).cuda()
            self.context.set_input_shape(n, tuple(bufs[n].shape))
        for n in self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            bufs[n] = torch.empty(shape, dtype=torch.float32, device="cuda")
        for n, b in bufs.items():
            self.context.set_tensor_address(n, b.data_ptr())
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return [bufs[n].cpu().numpy() for n in self.output_names]


MIN_TRT_MAJOR = 10  # strongly typed networks


def gpu_name() -> str:
    """The GPU this process builds on (engines and timing caches are specific to it): CUDA's device name, else
    nvidia-smi's, else a Jetson's device-tree model."""
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    model = Path("/proc/device-tree/model")
    return model.read_text().strip("\0 \n") if model.is_file() else "unknown-gpu"


def engine_config(profile: Profile, trt_version: str, gpu: str | None = None) -> dict[str, Any]:
    """What keys an engine: engines are specific to the GPU (its name and compute capability) and the TensorRT
    version; networks are strongly typed; the builder's workspace is bounded by the profile's GPU memory (a
    quarter of it)."""
    spec = profile.gpu
    if spec is None:
        raise SdkMissing(f"profile {profile.id} has no [gpu] table; the tensorrt target needs one")
    major = int(trt_version.split(".")[0])
    if major < MIN_TRT_MAJOR:
        raise SdkMissing(f"TensorRT {trt_version} is too old: edgec builds strongly typed networks, TensorRT "
                         f"{MIN_TRT_MAJOR} or later (JetPack 6 ships 10)")
    return {"strongly_typed": True, "sparse": spec.sparse_tensor_cores, "sm": spec.sm, "tensorrt": trt_version,
            "gpu": gpu or spec.name, "workspace_bytes": spec.memory_mb * 1024 * 1024 // 4}


def timing_cache_path(cache_root: Path, cfg: dict[str, Any]) -> Path:
    """One builder timing cache per (TensorRT version, GPU)."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", str(cfg["gpu"])).strip("-").lower()
    return Path(cache_root) / "tensorrt" / "timing" / f"trt{cfg['tensorrt']}-{gpu}-sm{cfg['sm']}.cache"


def strongly_typed_network(trt: Any, builder: Any) -> Any:
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


class TensorRTTarget:
    name = "tensorrt"

    def available(self) -> str | None:
        try:
            _import_trt()
        except SdkMissing as e:
            return str(e)
        return None

    def supports(self, model: onnx.ModelProto, profile: Profile) -> Coverage:
        reason = self.available()
        if reason is not None:
            ops = {n.op_type for n in model.graph.node}
            return Coverage(self.name, {}, {op: reason for op in ops})
        trt = _import_trt()
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
        trt = _import_trt()
        cfg = engine_config(profile, trt.__version__, gpu_name())
        timing = timing_cache_path(cache.root, cfg)

        def write(d: Path) -> tuple[str, dict[str, Any]]:
            logger = trt.Logger(trt.Logger.WARNING)
            builder = trt.Builder(logger)
            network = strongly_typed_network(trt, builder)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(art.payload.read_bytes()):
                errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise SdkMissing(f"TensorRT could not parse the model: {errs}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg["workspace_bytes"])
            # No FP16/INT8 flags: a strongly typed network takes its precision from the ONNX (edgec's passes).
            if cfg["sparse"] and hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
                config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
            config.set_timing_cache(config.create_timing_cache(timing.read_bytes() if timing.is_file() else b""),
                                    False)
            engine = builder.build_serialized_network(network, config)
            if engine is None:
                raise SdkMissing(f"TensorRT {cfg['tensorrt']} could not build an engine for {art.key[:12]}; "
                                 "see its log above")
            (d / "model.engine").write_bytes(bytes(engine))
            timing.parent.mkdir(parents=True, exist_ok=True)
            tmp = timing.with_name(f".{timing.name}.{os.getpid()}")
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
            os.replace(tmp, timing)  # concurrent builds: the last whole cache wins
            return "model.engine", {"source": art.key, **cfg, "timing_cache": str(timing)}

        sk = StepKey("compile:tensorrt", (art.key,), cfg, 2, profile.id)
        return cache.get_or_build(sk, "trt-engine", write)

    def load(self, art: Artifact) -> TensorRTRunner:
        return TensorRTRunner(art.payload)

    def kernels(self, art: Artifact) -> list[dict[str, Any]]:
        return [{"name": "engine", "origin": "vendor", "ops": []}]
