"""Running a TVM library: the Relax VM with pre-bound, aligned input buffers (no Python on the hot path
beyond one copy per input)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from targets.base import SimpleRunner
from targets.tvm.frontend import import_tvm


class TvmRunner(SimpleRunner):
    def __init__(self, lib_path: Path, input_names: list[str], threads: int) -> None:
        tvm = import_tvm()
        from tvm import relax

        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        cfg = tvm.get_global_func("runtime.config_threadpool", True)
        if cfg is not None:
            cfg(1, threads)
        self._tvm = tvm
        self.lib = tvm.runtime.load_module(str(lib_path))
        self.vm = relax.VirtualMachine(self.lib, tvm.cpu())
        self.input_names = input_names
        import tvm_ffi

        self._from_dlpack = tvm_ffi.from_dlpack
        # Per input (name, staging array); None until the first call fixes the input shapes.
        self._stage: list[tuple[str, np.ndarray]] | None = None
        self._call: Any = None  # main with the staging tensors bound (VirtualMachine.save_function)
        self._single = True

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # Per-call cost matters as much as the kernels for a ~5 us model, so the hot path is: copy each
        # input into its 64-byte aligned staging array (tvm.runtime.tensor(ndarray) would cost ~10 us),
        # call main with those tensors pre-bound (no argument conversion), read outputs through DLPack.
        # Every call still reads the caller's current input and returns fresh arrays (the .copy(): a
        # graph output may alias a constant or an input, which a later call would overwrite).
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
            return [np.from_dlpack(out).copy()]
        return [np.from_dlpack(o).copy() for o in out]

    def _bind(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """(Re)create the staging arrays for the shapes in ``feed``, bind them to main, run once."""
        stage, tensors = [], []
        for n in self.input_names:
            v = np.asarray(feed[n])
            arr = _aligned_empty(v.shape, v.dtype)
            stage.append((n, arr))
            tensors.append(self._from_dlpack(arr))
        self.vm.save_function("main", "edgec_bound_main", *tensors)
        self._call = self.vm["edgec_bound_main"]
        self._stage = stage
        for n, arr in stage:
            np.copyto(arr, feed[n])
        out = self._call()
        self._single = hasattr(out, "shape")
        outs = [out] if self._single else list(out)
        return [np.from_dlpack(o).copy() for o in outs]


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary (TVM's buffer alignment)."""
    dt = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape)) * dt.itemsize)
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + nbytes].view(dt).reshape(shape)
