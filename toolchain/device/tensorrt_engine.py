"""TensorRT engines from ONNX, for the host target (``targets.tensorrt``) and the lean device runtime alike: one
implementation of what keys an engine, how it is built and how it runs.

An engine is specific to the TensorRT version and the GPU (its name and compute capability), so it is built
where it runs: on a Jetson, from the ONNX the host uploads (JetPack's TensorRT, not the registry's). Networks
are strongly typed (TensorRT 10 and 11): precision comes from the ONNX itself (edgec's fp16 casts, int8 Q/DQ),
never from builder flags. The builder's workspace is bounded (``EngineSpec.workspace_bytes``) and its timing
cache persists per (TensorRT version, GPU, sm) under ``<root>/tensorrt/timing``.

Built engines are cached under ``<root>/tensorrt/engines``, keyed by (ONNX sha256, TensorRT version, GPU, sm,
workspace, sparse, strongly typed). Deserializing an engine loads code, so the cache is treated as hostile:
each engine has its sha256 beside it, the bytes are read once, hashed and compared before they reach
``deserialize_cuda_engine``; a truncated or altered engine (or a link, or a missing digest) is deleted and
rebuilt, never deserialized. The timing cache is checked the same way (a bad one is dropped: the build starts
from an empty one). The digest detects corruption and tampering with the engine file alone; whoever can write
both files can replace both, so the cache directory is created private (0700).

Imports: the standard library, numpy, ``core.errors``; ``tensorrt`` lazily. Device memory goes through the CUDA
driver library (``libcuda``, present wherever an NVIDIA driver is) with ctypes: no torch, no cuda-python.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.errors import SdkMissing, UsageError

log = logging.getLogger("edgec.tensorrt")

NEEDS = "the tensorrt target needs an NVIDIA GPU and the tensorrt package (pip install edgec[tensorrt]; on a " \
        "Jetson, JetPack's python3-libnvinfer)"
MIN_TRT_MAJOR = 10  # strongly typed networks
ENGINE_CACHE_VERSION = 1  # bump when the way an engine is built changes
CACHE_ENV = "EDGEC_DEVICE_CACHE"  # where a device keeps its engines and timing caches
MIN_WORKSPACE_BYTES = 16 << 20
# Device nodes of a visible NVIDIA GPU: discrete GPUs, and Jetson's integrated one (nvgpu, JetPack 5 and 6).
GPU_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-ctrl", "/dev/nvgpu/igpu0/ctrl")


def gpu_visible() -> bool:
    """An NVIDIA GPU's device node exists here (looked up, nothing loaded)."""
    return any(Path(p).exists() for p in GPU_NODES)


def import_tensorrt() -> Any:
    """The tensorrt module, when it is installed, a GPU is visible and it is 10 or later; SdkMissing otherwise."""
    try:
        import tensorrt as trt
    except ImportError:
        raise SdkMissing(f"{NEEDS}; tensorrt is not installed") from None
    if not gpu_visible():
        raise SdkMissing(f"{NEEDS}; no NVIDIA GPU is visible on this machine")
    check_tensorrt_version(str(trt.__version__))
    return trt


def check_tensorrt_version(version: str) -> None:
    if int(version.split(".")[0]) < MIN_TRT_MAJOR:
        raise SdkMissing(f"TensorRT {version} is too old: edgec builds strongly typed networks, TensorRT "
                         f"{MIN_TRT_MAJOR} or later (JetPack 6 ships 10)")


def workspace_for_memory(memory_bytes: int) -> int:
    """The builder's workspace bound: a quarter of the GPU's memory."""
    return int(memory_bytes) // 4


@dataclass(frozen=True)
class EngineSpec:
    """Everything besides the ONNX that decides an engine."""

    tensorrt: str  # TensorRT version
    gpu: str  # GPU name
    sm: int  # compute capability, e.g. 87 for Orin
    workspace_bytes: int
    sparse: bool = False  # let the builder use 2:4 sparse weights where the GPU has sparse tensor cores
    strongly_typed: bool = True  # always: precision comes from the ONNX

    def to_json(self) -> dict[str, Any]:
        return {"strongly_typed": self.strongly_typed, "sparse": self.sparse, "sm": self.sm,
                "tensorrt": self.tensorrt, "gpu": self.gpu, "workspace_bytes": self.workspace_bytes}


def engine_key(onnx_sha256: str, spec: EngineSpec) -> str:
    """The engine cache key: sha256 over the ONNX's sha256 and the spec."""
    if not re.fullmatch(r"[0-9a-f]{64}", onnx_sha256):
        raise UsageError(f"engine_key takes a sha256 hex digest, got {onnx_sha256[:80]!r}")
    material = {"onnx_sha256": onnx_sha256, "version": ENGINE_CACHE_VERSION, **spec.to_json()}
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def timing_cache_path(root: Path, cfg: Mapping[str, Any] | EngineSpec) -> Path:
    """One builder timing cache per (TensorRT version, GPU, sm) under ``root/tensorrt/timing``."""
    c = cfg.to_json() if isinstance(cfg, EngineSpec) else cfg
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", str(c["gpu"])).strip("-").lower()
    return Path(root) / "tensorrt" / "timing" / f"trt{c['tensorrt']}-{gpu}-sm{c['sm']}.cache"


def device_cache_root() -> Path:
    """Where this device keeps engines and timing caches: ``$EDGEC_DEVICE_CACHE``, else
    ``$XDG_CACHE_HOME/edgec/device``, else ``~/.cache/edgec/device``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgec" / "device"


# -- files with their digest beside them ------------------------------------------------------------------------


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_regular(path: Path) -> bytes | None:
    """The bytes of a regular file, read through no link; None when it is missing, a link or not a file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_verified(path: Path) -> bytes | None:
    """The file's bytes when they hash to the digest stored beside it; otherwise None, and both files are
    removed (a truncated, altered or half-written entry is rebuilt, never used)."""
    data = _read_regular(path)
    stored = _read_regular(digest_path(path))
    if data is None and stored is None:
        return None
    if data is not None and stored is not None and hmac.compare_digest(
            hashlib.sha256(data).hexdigest(), stored.decode("ascii", "replace").strip()):
        return data
    log.warning("%s does not match its digest (missing, truncated or altered): removed, it will be rebuilt", path)
    for p in (path, digest_path(path)):
        try:
            if p.is_symlink() or p.is_file():
                p.unlink()
        except OSError:
            pass
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # concurrent writers: the last whole file wins


def write_verified(path: Path, data: bytes) -> None:
    """Write ``data`` and its sha256 beside it (the data first: a reader between the two sees a mismatch and
    rebuilds). The directory is created private."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(path, data)
    _write_atomic(digest_path(path), hashlib.sha256(data).hexdigest().encode() + b"\n")


# -- building -----------------------------------------------------------------------------------------------------


def strongly_typed_network(trt: Any, builder: Any) -> Any:
    """A strongly typed network definition (TensorRT 11 has no other kind and may drop the flag)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return builder.create_network(0 if flag is None else 1 << int(flag))


def parse_onnx(trt: Any, onnx_bytes: bytes, logger: Any) -> tuple[Any, Any, Any]:
    """(builder, network, parser) for the ONNX, or SdkMissing with TensorRT's parser errors."""
    builder = trt.Builder(logger)
    network = strongly_typed_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SdkMissing(f"TensorRT could not parse the model: {errs}")
    return builder, network, parser


def build_engine(trt: Any, onnx_bytes: bytes, spec: EngineSpec, timing_path: Path) -> bytes:
    """A serialized engine for ``onnx_bytes``: strongly typed, the workspace bounded, dynamic dimensions fixed
    to 1, the timing cache at ``timing_path`` loaded (when its digest holds) and persisted."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = parse_onnx(trt, onnx_bytes, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    # No FP16/INT8 flags: a strongly typed network takes its precision from the ONNX (edgec's passes).
    if spec.sparse and hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if any(d < 0 for t in inputs for d in t.shape):  # edgec deploys batch 1: one profile, every free dim 1
        profile = builder.create_optimization_profile()
        for t in inputs:
            fixed = tuple(1 if d < 0 else int(d) for d in t.shape)
            profile.set_shape(t.name, fixed, fixed, fixed)
        config.add_optimization_profile(profile)
    timing = read_verified(timing_path) or b""
    config.set_timing_cache(config.create_timing_cache(timing), False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise SdkMissing(f"TensorRT {spec.tensorrt} could not build an engine on {spec.gpu}; see its log above")
    write_verified(timing_path, bytes(config.get_timing_cache().serialize()))
    return bytes(engine)


def engine_cache_path(root: Path, onnx_bytes: bytes, spec: EngineSpec) -> Path:
    """Where the engine for ``onnx_bytes`` and ``spec`` is cached under ``root`` (its digest beside it)."""
    return Path(root) / "tensorrt" / "engines" / f"{engine_key(hashlib.sha256(onnx_bytes).hexdigest(), spec)}.engine"


def load_or_build_engine(trt: Any, onnx_bytes: bytes, spec: EngineSpec, root: Path) -> tuple[bytes, bool]:
    """(serialized engine, built): from the engine cache under ``root`` when its digest holds, else built here
    (the timing cache under ``root`` too) and stored with its digest."""
    path = engine_cache_path(root, onnx_bytes, spec)
    cached = read_verified(path)
    if cached is not None:
        return cached, False
    engine = build_engine(trt, onnx_bytes, spec, timing_cache_path(root, spec))
    write_verified(path, engine)
    return engine, True


# -- the GPU, through the CUDA driver library -------------------------------------------------------------------

CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


class CudaDriver:
    """Device 0 through ``libcuda`` (ctypes): its identity, and memory and a stream on its primary context (the
    one TensorRT's CUDA runtime uses)."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise SdkMissing(f"{NEEDS}; the NVIDIA driver library libcuda.so.1 does not load ({e})") from None
        self.lib = lib
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.cuMemcpyDtoHAsync_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        lib.cuStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cuStreamDestroy_v2.argtypes = [ctypes.c_void_p]
        lib.cuDeviceGetName.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.cuDeviceTotalMem_v2.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.c_int]
        self.check(lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self.check(lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        self.device = dev.value
        self.ctx = ctypes.c_void_p()
        self.check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), self.device), "cuDevicePrimaryCtxRetain")
        self.check(lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else f"CUDA error {status}"
            raise SdkMissing(f"{what} failed: {text}; check the NVIDIA driver and that the GPU is free")

    def identity(self) -> tuple[str, int, int]:
        """(name, sm, total memory in bytes) of device 0."""
        name = ctypes.create_string_buffer(256)
        self.check(self.lib.cuDeviceGetName(name, 256, self.device), "cuDeviceGetName")
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                                 self.device), "cuDeviceGetAttribute")
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                                 self.device), "cuDeviceGetAttribute")
        total = ctypes.c_size_t()
        self.check(self.lib.cuDeviceTotalMem_v2(ctypes.byref(total), self.device), "cuDeviceTotalMem")
        return name.value.decode(errors="replace").strip(), major.value * 10 + minor.value, int(total.value)

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), max(1, nbytes)), "cuMemAlloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cuMemFree_v2(ptr)

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cuStreamCreate(ctypes.byref(s), 0), "cuStreamCreate")
        return int(s.value or 0)

    def to_device(self, dst: int, src: np.ndarray, stream: int) -> None:
        self.check(self.lib.cuMemcpyHtoDAsync_v2(dst, src.ctypes.data, src.nbytes, stream), "cuMemcpyHtoD")

    def to_host(self, dst: np.ndarray, src: int, stream: int) -> None:
        self.check(self.lib.cuMemcpyDtoHAsync_v2(dst.ctypes.data, src, dst.nbytes, stream), "cuMemcpyDtoH")

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def destroy_stream(self, stream: int) -> None:
        self.lib.cuStreamDestroy_v2(stream)


def gpu_identity() -> tuple[str, int | None]:
    """(name, sm) of the GPU this process builds on: the CUDA driver's for device 0; else nvidia-smi's name, else
    a Jetson's device-tree model, with the sm unknown (None)."""
    try:
        name, sm, _ = CudaDriver().identity()
        return name, sm
    except SdkMissing:
        pass
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                           capture_output=True, text=True, check=False)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0], None
    model = Path("/proc/device-tree/model")
    return (model.read_text().strip("\0 \n") if model.is_file() else "unknown-gpu"), None


def gpu_name() -> str:
    return gpu_identity()[0]


# -- running ------------------------------------------------------------------------------------------------------


class EngineRunner:
    """A deserialized engine on device 0: device buffers bound once per input shape, one stream; ``infer`` copies
    the inputs in, enqueues the engine, copies the outputs back and waits. A context manager."""

    def __init__(self, trt: Any, engine_bytes: bytes, cuda: CudaDriver | None = None) -> None:
        self.cuda = cuda or CudaDriver()
        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise SdkMissing("TensorRT could not deserialize the engine (built by another TensorRT or GPU?); "
                             "rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = self.cuda.stream()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._device: dict[str, int] = {}
        self._host_out: dict[str, np.ndarray] = {}

    def __enter__(self) -> EngineRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for ptr in self._device.values():
            self.cuda.free(ptr)
        self._device.clear()
        if self.stream:
            self.cuda.destroy_stream(self.stream)
            self.stream = 0

    def _bind(self, feed: dict[str, np.ndarray]) -> None:
        for ptr in self._device.values():
            self.cuda.free(ptr)
        self._device.clear()
        for n in self.input_names:
            shape = tuple(int(d) for d in np.shape(feed[n]))
            self.context.set_input_shape(n, shape)
            self._shapes[n] = shape
            self._device[n] = self.cuda.alloc(int(np.prod(shape)) * self.dtypes[n].itemsize)
        for n in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            self._host_out[n] = np.empty(shape, self.dtypes[n])
            self._device[n] = self.cuda.alloc(self._host_out[n].nbytes)
        for n, ptr in self._device.items():
            self.context.set_tensor_address(n, ptr)

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if any(tuple(np.shape(feed[n])) != self._shapes.get(n) for n in self.input_names):
            self._bind(feed)
        staged = [(n, np.ascontiguousarray(feed[n], dtype=self.dtypes[n])) for n in self.input_names]
        for n, arr in staged:
            self.cuda.to_device(self._device[n], arr, self.stream)
        if not self.context.execute_async_v3(self.stream):
            raise SdkMissing("TensorRT failed to enqueue the engine; see its log above")
        for n in self.output_names:
            self.cuda.to_host(self._host_out[n], self._device[n], self.stream)
        self.cuda.synchronize(self.stream)  # also keeps ``staged`` alive until the copies are done
        return [self._host_out[n].copy() for n in self.output_names]
