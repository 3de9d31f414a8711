"""Runners for compiled payloads that need nothing but numpy and the payload's own runtime (TVM's, ONNX
Runtime's, TensorRT's): the one implementation the targets, the lean device runtime and the benchmarks load
artifacts with. Each is a context manager with ``infer(feed) -> [arrays]``."""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.errors import UsageError
from toolchain.core.tvm_abi import MAIN, MAIN_WITH_WEIGHTS, WEIGHTS, tensor_nbytes
from toolchain.device.tensorrt_engine import (
    MIN_WORKSPACE_BYTES,
    CudaDriver,
    EngineRunner,
    EngineSpec,
    device_cache_root,
    import_tensorrt,
    load_or_build_engine,
    workspace_for_memory,
)


class TvmLibRunner:
    """A TVM library on the Relax VM with pre-bound, 64-byte aligned input buffers: one copy per input on the
    hot path, outputs read through DLPack. A library that exports its weights (``toolchain.core.tvm_abi``: built
    when they nearly fill L2) runs with them copied into one buffer on a huge-page boundary (``weight_buffer``),
    which spreads them evenly over the cache's sets."""

    def __init__(self, lib_path: Path, input_names: list[str], threads: int) -> None:
        import tvm
        import tvm_ffi
        from tvm.runtime.vm import VirtualMachine

        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        cfg = tvm_ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
        if cfg is not None:
            cfg(1, threads)
        self.lib = tvm.runtime.load_module(str(lib_path))
        self.vm = VirtualMachine(self.lib, tvm.cpu())
        self.input_names = input_names
        self._from_dlpack = tvm_ffi.from_dlpack
        self._stage: list[tuple[str, np.ndarray]] | None = None  # None until the first call fixes the shapes
        self._call: Any = None
        self._single = True
        self.weights = place_weights(self.vm, self._from_dlpack)

    def __enter__(self) -> TvmLibRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        stage = self._stage
        if stage is None:
            return self._bind(feed)
        for name, arr in stage:
            v = feed[name]
            if v.shape != arr.shape or v.dtype != arr.dtype:
                return self._bind(feed)
            np.copyto(arr, v)
        out = self._call()
        if self._single:
            return [np.from_dlpack(out).copy()]  # a copy: an output may alias a constant or an input
        return [np.from_dlpack(o).copy() for o in out]

    def _bind(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        stage, tensors = [], []
        for n in self.input_names:
            v = np.asarray(feed[n])
            arr = aligned_empty(v.shape, v.dtype)
            stage.append((n, arr))
            tensors.append(self._from_dlpack(arr))
        if self.weights:
            self.vm.save_function(MAIN_WITH_WEIGHTS, "edgec_bound_main", *tensors, *self.weights)
        else:
            self.vm.save_function(MAIN, "edgec_bound_main", *tensors)
        self._call = self.vm["edgec_bound_main"]
        self._stage = stage
        for n, arr in stage:
            np.copyto(arr, feed[n])
        out = self._call()
        self._single = hasattr(out, "shape")
        outs = [out] if self._single else list(out)
        return [np.from_dlpack(o).copy() for o in outs]


HUGE_PAGE = 2 << 20  # x86-64 and aarch64 (4 KB granule) transparent huge pages


def weight_buffer(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array of ``nbytes`` that starts on a 2 MB boundary, in anonymous memory the OS is asked to
    back with transparent huge pages (on bare metal physically contiguous 2 MB: every L2 set gets its share of the
    bytes). Where THP is off it is 4 KB pages, as any allocation would be."""
    size = max(HUGE_PAGE, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
    area = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(area, np.uint8)  # the array keeps the mapping alive
    start = (-raw.ctypes.data) % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # THP compiled out: 4 KB pages
            area.madvise(mmap.MADV_HUGEPAGE, start, size)
    return raw[start : start + nbytes]


def place_weights(vm: Any, from_dlpack: Any) -> list[Any]:
    """The library's exported weights (``WEIGHTS``) copied into one ``weight_buffer``, each on a 64-byte boundary,
    in argument order; [] when the library exports none."""
    source = list(vm[WEIGHTS]()) if vm.module.implements_function(WEIGHTS) else []
    if not source:
        return []
    sizes = [tensor_nbytes(w) for w in source]
    ends = np.cumsum([-(-n // 64) * 64 for n in sizes]).tolist()
    region = weight_buffer(ends[-1])
    placed = []
    for w, off, n in zip(source, [0, *ends[:-1]], sizes, strict=True):
        # a byte range of the region typed as the weight (the kernels take no byte offset: the data pointer moves)
        view = from_dlpack(region[off : off + n])._create_view(tuple(w.shape), w.dtype)
        w.copyto(view)
        placed.append(view)
    return placed


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary (TVM's buffer alignment)."""
    dt = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape)) * dt.itemsize)
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + nbytes].view(dt).reshape(shape)


class OrtModelRunner:
    """An ONNX Runtime CPU session opened as ``core.onnx_io.ort_session`` does (quiet, ``threads`` intra-op
    threads, one inter-op thread, every graph optimization)."""

    def __init__(self, path: Path, input_names: list[str], threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def __enter__(self) -> OrtModelRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.sess.run(self.output_names, feed))


class TrtOnnxRunner(EngineRunner):
    """An ONNX model built into a TensorRT engine here, on the device that runs it (a Jetson's engine must come
    from its own TensorRT and GPU), through the engine cache under ``device_cache_root()``: a verified cached
    engine is reused, anything else is rebuilt. ``workspace_bytes`` (default: a quarter of the GPU's memory)
    and ``sparse`` come from the host's profile; the client cannot choose where the cache lies."""

    def __init__(self, path: Path, input_names: list[str], threads: int, workspace_bytes: int | None = None,
                 sparse: bool = False) -> None:
        trt = import_tensorrt()
        cuda = CudaDriver()
        gpu, sm, total = cuda.identity()
        if workspace_bytes is None:
            workspace_bytes = workspace_for_memory(total)
        if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) \
                or not MIN_WORKSPACE_BYTES <= workspace_bytes <= total:
            raise UsageError(f"workspace_bytes {workspace_bytes!r} must be an integer from {MIN_WORKSPACE_BYTES} "
                             f"to the GPU's {total} bytes")
        if not isinstance(sparse, bool):
            raise UsageError(f"sparse must be true or false, got {sparse!r}")
        spec = EngineSpec(str(trt.__version__), gpu, sm, workspace_bytes, sparse)
        engine, self.built = load_or_build_engine(trt, Path(path).read_bytes(), spec, device_cache_root())
        self.spec = spec
        super().__init__(trt, engine, cuda)
