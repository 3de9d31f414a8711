"""Backends behind one contract: ``supports`` -> Coverage, ``compile`` -> Artifact, ``load`` -> Runner.

Vendor SDKs are imported lazily inside each target module so ``import targets`` works where an SDK
is missing; ``available()`` says why a target cannot run here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from toolchain.errors import UsageError

if TYPE_CHECKING:
    import onnx

    from toolchain.cache import Artifact, Cache
    from toolchain.profile import Profile


@dataclass(frozen=True)
class Coverage:
    """Which nodes a target takes and which it cannot, with the reason for each refusal."""

    target: str
    supported_ops: dict[str, int]  # op type -> node count
    unsupported: dict[str, str]  # op type -> why
    notes: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.unsupported

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "complete": self.complete,
            "supported_ops": self.supported_ops,
            "unsupported": self.unsupported,
            "notes": list(self.notes),
        }


@dataclass
class KernelInfo:
    """One compiled kernel: what it is and where it came from (generic, tuned, hand-written)."""

    name: str
    origin: str  # "generic" | "tuned" | "hand-written" | "vendor"
    ops: list[str] = field(default_factory=list)


class Runner(Protocol):
    """A loaded artifact, ready to run. Use as a context manager."""

    input_names: list[str]

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...


class Target(Protocol):
    name: str

    def available(self) -> str | None:
        """None when the target can build here, else a one-line reason with the fix."""

    def supports(self, model: onnx.ModelProto, profile: Profile) -> Coverage: ...

    def compile(self, art: Artifact, profile: Profile, cache: Cache) -> tuple[Artifact, bool]: ...

    def load(self, art: Artifact) -> Runner: ...


def _ort() -> Target:
    from targets.ort import OrtTarget

    return OrtTarget()


def _tvm() -> Target:
    from targets.tvm import TvmTarget

    return TvmTarget()


def _trt() -> Target:
    from targets.tensorrt import TensorRTTarget

    return TensorRTTarget()


REGISTRY: dict[str, Callable[[], Target]] = {"ort": _ort, "tvm": _tvm, "tensorrt": _trt}

# The artifact kind each target's compile step produces, so load() can be routed from a manifest.
KIND_TO_TARGET = {"ort-model": "ort", "tvm-lib": "tvm", "trt-engine": "tensorrt"}


def get_target(name: str) -> Target:
    if name not in REGISTRY:
        raise UsageError(f"unknown target {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]()


def target_for_artifact(art: Artifact) -> Target:
    name = KIND_TO_TARGET.get(art.kind)
    if name is None:
        raise UsageError(
            f"artifact {art.key[:12]} is a {art.kind!r}, not a compiled model; run 'edgec compile' first"
        )
    return get_target(name)


class SimpleRunner:
    """Shared context-manager plumbing for runners."""

    input_names: list[str]

    def __enter__(self) -> SimpleRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass
