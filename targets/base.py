"""The contract every backend implements: ``supports`` -> Coverage, ``compile(art, profile, cache, options)``
-> Artifact, ``load`` -> Runner, ``kernels`` -> what runs where.

Vendor SDKs are imported lazily inside each target module so ``import targets`` works where an SDK
is missing; ``available()`` says why a target cannot run here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import onnx

    from toolchain.core.cache import Artifact, Cache
    from toolchain.core.profile import Profile


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


@dataclass(frozen=True)
class TuneOptions:
    """MetaSchedule tuning for one compile (the TVM target reads it; the others ignore it).

    ``trials=None`` is "auto": the profile's ``tuning.auto_trials`` where a heavy layer has no hand-written
    kernel, nothing otherwise. 0: hand-written kernels and the vector rule only."""

    trials: int | None = None
    trials_per_batch: int = 16
    tracker: str | None = None  # "host:port": measure candidates on a device there
    device_key: str | None = None
    token: str | None = None  # the device token; kept out of repr, JSON and cache keys
    progress: bool = True

    def __repr__(self) -> str:
        return (f"TuneOptions(trials={self.trials}, trials_per_batch={self.trials_per_batch}, "
                f"tracker={self.tracker}, device_key={self.device_key})")


@dataclass(frozen=True)
class CompileOptions:
    """What a caller decides about one compile beyond the artifact and the profile."""

    tune: TuneOptions = TuneOptions()
    # Inputs per call the artifact is built for. Edge deployments run batch 1 (every hand-written kernel is a
    # batch-1 kernel); a larger batch is for throughput measurements.
    batch: int = 1
    # The artifact runs on a remote device that builds its final form itself (a target implementing
    # BuildsOnDevice, i.e. TensorRT: engines are specific to the device's TensorRT and GPU). compile then returns
    # what the device builds from, and needs no SDK here.
    for_device: bool = False


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

    def compile(self, art: Artifact, profile: Profile, cache: Cache,
                options: CompileOptions = CompileOptions()) -> tuple[Artifact, bool]: ...

    def load(self, art: Artifact) -> Runner: ...

    def kernels(self, art: Artifact) -> list[dict[str, Any]]:
        """What runs where in a compiled artifact: one row per kernel with its origin."""


@runtime_checkable
class BuildsOnDevice(Protocol):
    """A target whose final build happens on the device (TensorRT engines are built with the device's own
    TensorRT for its own GPU): ``device_artifact`` is what the host sends instead."""

    def device_artifact(self, art: Artifact, profile: Profile, cache: Cache) -> tuple[Artifact, bool]: ...


class SimpleRunner:
    """Shared context-manager plumbing for runners."""

    input_names: list[str]

    def __enter__(self) -> SimpleRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass
