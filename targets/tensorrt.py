"""TensorRT target (NVIDIA GPUs, Jetson). Written against the TensorRT 10 Python API.

This machine has no NVIDIA GPU, so ``available()`` explains why the target cannot run and every
entry point raises SdkMissing (exit code 3) with the fix. The import is lazy so ``import targets``
works without the SDK.
"""

from __future__ import annotations

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


def engine_config(profile: Profile, trt_version: str) -> dict[str, Any]:
    """What keys an engine: engines are specific to the GPU (compute capability) and the TensorRT version,
    and the builder's workspace is bounded by the profile's GPU memory (a quarter of it)."""
    gpu = profile.gpu
    if gpu is None:
        raise SdkMissing(f"profile {profile.id} has no [gpu] table; the tensorrt target needs one")
    return {"fp16": gpu.fp16, "sparse": gpu.sparse_tensor_cores, "sm": gpu.sm, "tensorrt": trt_version,
            "workspace_bytes": gpu.memory_mb * 1024 * 1024 // 4}


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
        network = builder.create_network(0)
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
        cfg = engine_config(profile, trt.__version__)

        def write(d: Path) -> tuple[str, dict[str, Any]]:
            logger = trt.Logger(trt.Logger.WARNING)
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(art.payload.read_bytes()):
                errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise SdkMissing(f"TensorRT could not parse the model: {errs}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg["workspace_bytes"])
            if cfg["fp16"]:
                config.set_flag(trt.BuilderFlag.FP16)
            if cfg["sparse"]:
                config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
            engine = builder.build_serialized_network(network, config)
            (d / "model.engine").write_bytes(bytes(engine))
            return "model.engine", {"source": art.key, **cfg}

        sk = StepKey("compile:tensorrt", (art.key,), cfg, 1, profile.id)
        return cache.get_or_build(sk, "trt-engine", write)

    def load(self, art: Artifact) -> TensorRTRunner:
        return TensorRTRunner(art.payload)

    def kernels(self, art: Artifact) -> list[dict[str, Any]]:
        return [{"name": "engine", "origin": "vendor", "ops": []}]
