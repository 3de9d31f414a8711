"""ONNX Runtime (CPU execution provider) target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from targets.base import CompileOptions, Coverage, SimpleRunner
from toolchain.core.cache import Artifact, Cache, StepKey
from toolchain.core.onnx_io import load_onnx, ort_session
from toolchain.core.profile import Profile


def _cpu_kernel_ops() -> set[tuple[str, str]]:
    import onnxruntime.capi.onnxruntime_pybind11_state as st

    return {(d.domain or "", d.op_name) for d in st.get_all_opkernel_def() if d.provider == "CPUExecutionProvider"}


class OrtRunner(SimpleRunner):
    def __init__(self, path: Path, threads: int) -> None:
        self.sess = ort_session(path, threads)
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(self.output_names, feed)


class OrtTarget:
    name = "ort"

    def available(self) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed; pip install onnxruntime"
        return None

    def supports(self, model: onnx.ModelProto, profile: Profile) -> Coverage:
        known = _cpu_kernel_ops()
        sup: dict[str, int] = {}
        unsup: dict[str, str] = {}
        local_funcs = {(f.domain, f.name) for f in model.functions}
        for n in model.graph.node:
            key = (n.domain if n.domain not in ("ai.onnx",) else "", n.op_type)
            if key in known or key in local_funcs or key == ("", "Constant"):  # ORT folds Constant at load: no kernel
                sup[n.op_type] = sup.get(n.op_type, 0) + 1
            else:
                unsup[n.op_type] = f"no CPUExecutionProvider kernel for {key[0] or 'ai.onnx'}::{key[1]}"
        return Coverage(self.name, sup, unsup)

    def compile(self, art: Artifact, profile: Profile, cache: Cache,
                options: CompileOptions = CompileOptions()) -> tuple[Artifact, bool]:
        """Save ONNX Runtime's offline-optimized graph; the runner loads it with the profile's threads."""
        threads = profile.bench.threads

        def write(d: Path) -> tuple[str, dict]:
            ort_session(art.payload, threads, optimized_out=d / "model.ort.onnx")
            m = load_onnx(d / "model.ort.onnx", check=False)
            return "model.ort.onnx", {"threads": threads, "nodes": len(m.graph.node), "source": art.key}

        sk = StepKey("compile:ort", (art.key,), {"threads": threads, "level": "extended"}, 1, profile.id)
        return cache.get_or_build(sk, "ort-model", write)

    def load(self, art: Artifact) -> OrtRunner:
        return OrtRunner(art.payload, int(art.meta.get("threads", 1)))

    def kernels(self, art: Artifact) -> list[dict]:
        m = load_onnx(art.payload, check=False)
        return [{"name": n.name or n.op_type, "origin": "vendor", "ops": [n.op_type]} for n in m.graph.node]
