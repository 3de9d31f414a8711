"""Benchmark jobs and the devices that run them.

``prepare_job`` resolves a compiled artifact into a ``BenchJob``: its source model, evaluation inputs, the
labelled set and the reference outputs (the source ONNX on ONNX Runtime, computed here on the client).
A ``Device`` runs jobs: ``LocalDevice`` in this process, ``RpcFarm`` on the devices behind a TVM RPC
tracker. Both return the same result schema (``measure.job.assemble``), so ``bench``, ``build``, ``pick``
and ``ci`` never branch on where a job runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from targets import get_target, target_name_for_kind
from targets.ort import OrtRunner
from toolchain.core.cache import Artifact, Cache
from toolchain.core.errors import UsageError
from toolchain.core.onnx_io import fix_batch, input_specs, load_onnx
from toolchain.core.profile import Profile, load_profile
from toolchain.core.versions import environment
from toolchain.device.farm import Event, bench_many
from toolchain.device.protocol import RemoteSpec
from toolchain.measure.job import BenchJob, Labels, assemble
from toolchain.measure.timing import MeasureConfig, MemoryProbe, bench_loaded, run_batched
from toolchain.zoo.datasets import Dataset, load_dataset


def dataset_for(art: Artifact, data_dir: Path | None, data: str | None = None) -> Dataset | None:
    """The labelled set named by ``data``, else the one the model was trained on (None: no labels)."""
    name = data or art.meta.get("dataset")
    return load_dataset(name, data_dir) if name else None


def eval_inputs(ds: Dataset | None, samples: int, shape: tuple[int, ...]) -> np.ndarray:
    """The labelled test inputs (first ``samples``; 0 = all), or 64 seeded random inputs without data."""
    if ds is None:
        return np.random.default_rng(0).standard_normal((64, *shape[1:])).astype(np.float32)
    n = len(ds.x_test) if samples <= 0 else min(samples, len(ds.x_test))
    return ds.x_test[:n].astype(np.float32)


def source_onnx(art: Artifact, cache: Cache) -> Artifact:
    """The ONNX artifact a compiled artifact was built from."""
    src = cache.get(str(art.meta.get("source", "")))
    if src is None or src.kind != "onnx":
        raise UsageError(f"the source ONNX of {art.key[:12]} is not in the cache; rebuild it")
    return src


def prepare_job(art: Artifact, cache: Cache, *, profile: Profile | None = None, data: str | None = None,
                data_dir: Path | None = None, samples: int = 1000, duration_s: float | None = None,
                reference: Artifact | None = None) -> BenchJob:
    """Resolve the source model, inputs, dataset and the reference outputs (computed here, on the client)."""
    target = target_name_for_kind(art.kind, art.key)
    profile = profile or load_profile(art.profile or "x86-avx512")
    src = reference or source_onnx(art, cache)
    spec = input_specs(fix_batch(load_onnx(src.payload, check=False), 1))
    if len(spec) != 1:
        raise UsageError(f"bench takes single-input models for now; {art.key[:12]} has {len(spec)} inputs")
    ds = dataset_for(src, data_dir, data)
    name, shape = spec[0].name, tuple(spec[0].shape)
    x = eval_inputs(ds, samples, shape)
    with OrtRunner(src.payload, profile.bench.threads) as ref:
        ref_out = run_batched(ref, name, x, shape)
    labels = Labels(ds.name, ds.y_test) if ds is not None else None
    return BenchJob(art, target, profile.id, name, shape, x, ref_out, labels,
                    MeasureConfig.from_profile(profile.bench, duration_s))


class Device(Protocol):
    """Where bench jobs run. Every implementation returns {artifact key: bench result} in one schema."""

    name: str

    def run(self, jobs: list[BenchJob], on_event: Event | None = None) -> dict[str, dict[str, Any]]: ...


class LocalDevice:
    """This process: each job's artifact is loaded by its target and measured here, one after another."""

    name = "local"

    def run(self, jobs: list[BenchJob], on_event: Event | None = None) -> dict[str, dict[str, Any]]:
        emit: Callable[[str, str, str], None] = on_event or (lambda *_: None)
        out: dict[str, dict[str, Any]] = {}
        for job in jobs:
            emit("start", job.art.key, "local")
            target = get_target(job.target)
            dev = bench_loaded(lambda target=target, job=job: target.load(job.art), job.input_name, job.shape,
                               job.x, job.cfg, MemoryProbe())
            dev["environment"] = environment()
            dev["device"] = "local"
            out[job.art.key] = assemble(job, dev)
            emit("done", job.art.key, "local")
        return out


class RpcFarm:
    """The devices registered under one key at a TVM RPC tracker (``toolchain.device.farm``)."""

    def __init__(self, spec: RemoteSpec) -> None:
        self.spec = spec
        self.name = f"rpc://{spec.tracker_host}:{spec.tracker_port} (key {spec.key})"

    def run(self, jobs: list[BenchJob], on_event: Event | None = None) -> dict[str, dict[str, Any]]:
        return bench_many(jobs, self.spec, on_event)


def device_for(remote: RemoteSpec | None) -> Device:
    """The device a command measures on: the farm behind ``remote``, else this machine."""
    return RpcFarm(remote) if remote is not None else LocalDevice()
