"""The Python API: one function per CLI verb, keyword-only options, plain data back. No logic lives here;
each function calls the layer that does the work.

    from toolchain import api
    from toolchain.core.cache import Cache

    report = api.build("mlp-small", profile="x86-avx512", targets=["ort", "tvm"], passes=["cleanup"], cache=Cache())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from targets.base import CompileOptions, TuneOptions
from toolchain import bench as _bench
from toolchain import describe, pipeline, search
from toolchain.core.cache import Artifact, Cache
from toolchain.core.profile import Profile, load_profile
from toolchain.device.protocol import RemoteSpec
from toolchain.export import export_model, import_onnx_file
from toolchain.passes.manager import run_passes

__all__ = ["Artifact", "Cache", "CompileOptions", "RemoteSpec", "TuneOptions", "bench", "build", "compile",
           "export", "fastest", "import_onnx", "inspect", "optimize", "resolve_artifact"]


def export(model: str, *, cache: Cache, input_shape: str | None = None, weights: Path | None = None,
           data_dir: Path | None = None, form: str | None = None, progress: bool = True) -> tuple[Artifact, bool]:
    """MODEL (zoo name | .onnx | .pt2 | module:factory) -> ONNX artifact, parity with torch proven."""
    return export_model(model, cache, input_shape, weights, data_dir, form, progress)


def import_onnx(path: Path, *, cache: Cache) -> tuple[Artifact, bool]:
    """A user's ONNX file as an artifact keyed by its content."""
    return import_onnx_file(path, cache)


def optimize(art: Artifact, passes: list[str], *, cache: Cache, profile: Profile | None = None,
             data_dir: Path | None = None, target: str = "ort", data: str | None = None,
             only_if_faster: bool = False) -> tuple[Artifact, list[dict[str, Any]]]:
    """Apply passes in order, each a cached artifact; returns the last one and a report per pass."""
    return run_passes(art, passes, cache, profile=profile, data_dir=data_dir, target=target, data_name=data,
                      only_if_faster=only_if_faster)


def compile(art: Artifact, *, profile: Profile | str, target: str, cache: Cache,  # noqa: A001 -- the CLI verb
            options: CompileOptions = CompileOptions()) -> tuple[Artifact, bool]:
    """Compile an ONNX artifact for a device profile through one target."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    return pipeline.compile_artifact(art, prof, target, cache, options)


def bench(art: Artifact, *, cache: Cache, profile: Profile | None = None, data: str | None = None,
          data_dir: Path | None = None, samples: int = 1000, duration_s: float | None = None,
          reference: Artifact | None = None, remote: RemoteSpec | None = None) -> dict[str, Any]:
    """Latency (steady warm-up, bootstrap CIs, stable flag), agreement with the source ONNX on ONNX Runtime,
    task accuracy where labelled data exists, size and runner memory; here, or on the devices at ``remote``."""
    job = _bench.prepare_job(art, cache, profile=profile, data=data, data_dir=data_dir, samples=samples,
                             duration_s=duration_s, reference=reference)
    return _bench.device_for(remote).run([job])[art.key]


def build(model: str, *, profile: str, cache: Cache, targets: list[str] | None = None,
          passes: list[str] | None = None, input_shape: str | None = None, data: str | None = None,
          data_dir: Path | None = None, samples: int = 1000, duration_s: float | None = None,
          options: CompileOptions = CompileOptions(), batch: int = 1, progress: bool = True) -> dict[str, Any]:
    """export -> passes -> compile per target -> measure (interleaved); one report. ``batch`` > 1 adds each
    target's throughput at that batch beside the batch-1 latency."""
    return pipeline.build(model, profile, cache, targets=targets, passes=passes, input_shape=input_shape,
                          data=data, data_dir=data_dir, samples=samples, duration_s=duration_s, options=options,
                          batch=batch, progress=progress)


def fastest(model: str, *, profile: str, cache: Cache, max_drop: float = 1.0, data: str | None = None,
            data_dir: Path | None = None, samples: int = 0, duration_s: float | None = None,
            remote: RemoteSpec | None = None, options: CompileOptions = CompileOptions(),
            input_shape: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Every target x pass chain edgec can build for the profile, measured together; the fastest variant whose
    accuracy drop (on the full test set by default) stays within ``max_drop`` points is chosen."""
    return search.fastest(model, load_profile(profile), cache, max_drop=max_drop, data=data, data_dir=data_dir,
                          samples=samples, duration_s=duration_s, remote=remote, options=options,
                          input_shape=input_shape, progress=progress)


def resolve_artifact(ref: str, *, cache: Cache) -> Artifact:
    """An artifact by key, key prefix, cache directory or manifest path."""
    return describe.resolve_artifact(ref, cache)


def inspect(ref: str, *, cache: Cache, profile: str = "x86-avx512") -> dict[str, Any]:
    """Describe an ONNX file or a cached artifact."""
    return describe.inspect(ref, cache, profile)
