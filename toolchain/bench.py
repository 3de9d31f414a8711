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
from toolchain.core.onnx_io import check_input_size, fix_batch, input_specs, load_onnx
from toolchain.core.profile import Profile, load_profile
from toolchain.core.versions import environment
from toolchain.device.farm import Event, bench_many
from toolchain.device.protocol import RemoteSpec
from toolchain.measure.job import BenchJob, Labels, assemble
from toolchain.measure.timing import (
    MeasureConfig,
    MemoryProbe,
    RunnerFactory,
    bench_loaded,
    measure_interleaved,
    run_batched,
)
from toolchain.zoo.datasets import Dataset, load_dataset


def dataset_for(art: Artifact, data_dir: Path | None, data: str | None = None) -> Dataset | None:
    """The labelled set named by ``data``, else the one the model was trained on (None: no labels)."""
    name = data or art.meta.get("dataset")
    return load_dataset(name, data_dir) if name else None


def eval_inputs(ds: Dataset | None, samples: int, shape: tuple[int, ...]) -> np.ndarray:
    """The labelled test inputs (first ``samples``; 0 = all), or 64 seeded random inputs without data."""
    check_input_size((64, *shape[1:]), "model input (64 evaluation samples)")
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
    if not (cache.holds(art) and cache.verify(art)):  # benching loads the artifact's code: only intact cache entries
        raise UsageError(f"artifact {art.dir} fails verification or lies outside the cache {cache.root}; rebuild it")
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
    """This process. One job is measured as ``edgec bench`` always has (``bench_loaded``); several jobs are
    measured interleaved round by round (``measure_interleaved``), so machine noise hits them alike and their
    latencies can be compared."""

    name = "local"

    def run(self, jobs: list[BenchJob], on_event: Event | None = None) -> dict[str, dict[str, Any]]:
        emit: Callable[[str, str, str], None] = on_event or (lambda *_: None)
        if not jobs:
            return {}
        for job in jobs:
            emit("start", job.art.key, "local")
        loaders = {job.art.key: _loader(job) for job in jobs}
        if len(jobs) == 1:
            job = jobs[0]
            raw = {job.art.key: bench_loaded(loaders[job.art.key], job.input_name, job.shape, job.x, job.cfg,
                                             MemoryProbe())}
        else:
            raw = self._interleaved(jobs, loaders)
        out: dict[str, dict[str, Any]] = {}
        env = environment()
        for job in jobs:
            out[job.art.key] = assemble(job, {**raw[job.art.key], "environment": env, "device": "local"})
            emit("done", job.art.key, "local")
        return out

    @staticmethod
    def _interleaved(jobs: list[BenchJob], loaders: dict[str, RunnerFactory]) -> dict[str, dict[str, Any]]:
        cfgs = {job.cfg for job in jobs}
        if len(cfgs) != 1:
            raise UsageError("jobs measured together must share one measurement configuration (profile, duration)")
        cfg = cfgs.pop()
        lats = measure_interleaved({job.art.key: (loaders[job.art.key], {job.input_name: job.x[:1].reshape(job.shape)})
                                    for job in jobs}, cfg)
        raw: dict[str, dict[str, Any]] = {}
        for job in jobs:
            memory = MemoryProbe()  # per job: the growth from loading this runner and running every input
            with loaders[job.art.key]() as runner:
                outputs = run_batched(runner, job.input_name, job.x, job.shape)
                memory.sample()
            lat = lats[job.art.key]
            raw[job.art.key] = {"latency": lat.to_json(), "samples_ms": lat.samples_ms, "outputs": outputs,
                                "memory": memory.to_json()}
        return raw


def _loader(job: BenchJob) -> RunnerFactory:
    target = get_target(job.target)
    return lambda: target.load(job.art)


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
