"""The backends and the one table that routes artifact kinds to them.

``get_target(name)`` gives a backend (``targets.base.Target``); ``load_runner(kind, path, ...)`` loads a
compiled payload by its artifact kind, for the local bench and the device server alike. Backends are
imported on demand: each pulls in its SDK, and ``import targets`` must work without them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from targets.base import Runner, Target
from toolchain.core.cache import Artifact
from toolchain.core.errors import UsageError

# target name -> (module, Target class, module and class of the Runner of its payloads)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "ort": ("targets.ort", "OrtTarget", "targets.ort:OrtRunner"),
    "tvm": ("targets.tvm", "TvmTarget", "toolchain.device.runners:TvmLibRunner"),
    "tensorrt": ("targets.tensorrt", "TensorRTTarget", "targets.tensorrt:TensorRTRunner"),
}

# The artifact kind each target's compile step produces, so a payload can be routed to its runner.
# "trt-onnx": the ONNX a device builds its own TensorRT engine from (``TensorRTTarget.device_artifact``).
KIND_TO_TARGET = {"ort-model": "ort", "tvm-lib": "tvm", "trt-engine": "tensorrt", "trt-onnx": "tensorrt"}


def get_target(name: str) -> Target:
    if name not in REGISTRY:
        raise UsageError(f"unknown target {name!r}; choose one of {', '.join(REGISTRY)}")
    module, cls, _ = REGISTRY[name]
    target: Target = getattr(importlib.import_module(module), cls)()
    return target


def target_name_for_kind(kind: str, key: str = "") -> str:
    name = KIND_TO_TARGET.get(kind)
    if name is None:
        raise UsageError(f"artifact {key[:12]} is a {kind!r}, not a compiled model; run 'edgec compile' first")
    return name


def target_for_artifact(art: Artifact) -> Target:
    return get_target(target_name_for_kind(art.kind, art.key))


def load_runner(kind: str, path: Path, input_names: list[str], threads: int) -> Runner:
    """A runner for a compiled payload of ``kind`` (no manifest needed: the device server has only the file)."""
    module, _, cls = REGISTRY[target_name_for_kind(kind)][2].partition(":")
    runner_cls = getattr(importlib.import_module(module), cls)
    if kind == "tvm-lib":
        runner: Runner = runner_cls(path, input_names, threads)
    elif kind == "ort-model":
        runner = runner_cls(path, threads)
    else:
        runner = runner_cls(path)
    return runner
