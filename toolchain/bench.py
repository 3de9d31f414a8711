"""Benchmark jobs and the devices that run them.

``prepare_job`` resolves a compiled artifact into a ``BenchJob``: its source model, evaluation inputs, the
labelled set and the reference outputs (the source ONNX on ONNX Runtime, computed here on the client).
A ``Device`` runs jobs: ``LocalDevice`` in this process, ``RpcFarm`` on the devices behind a TVM RPC
tracker. Both return the same result schema (``measure.job.assemble``), so ``bench``, ``build``, ``pick``
and ``ci`` never branch on where a job runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from targets import get_target, target_name_for_kind
from targets.ort import OrtRunner
from targets.tensorrt import TensorRTTarget
from toolchain.core.cache import Artifact, Cache
from toolchain.core.errors import UsageError
from toolchain.core.onnx_io import check_input_size, fix_batch, input_specs, load_onnx
from toolchain.core.profile import Profile, load_profile
from toolchain.core.versions import environment
from toolchain.device.farm import Event, bench_many
from toolchain.device.protocol import RemoteSpec
from toolchain.measure.job import BenchJob, Labels, assemble, run_job_inputs
from toolchain.measure.timing import (
    MeasureConfig,
    MemoryProbe,
    RunnerFactory,
    bench_loaded,
    measure_interleaved,
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
    specs = input_specs(fix_batch(load_onnx(src.payload, check=False), 1))
    ds = dataset_for(src, data_dir, data)
    if len(specs) > 1 and ds is not None:
        raise UsageError(f"{art.key[:12]} has {len(specs)} inputs and dataset {ds.name} has one; bench it without "
                         "--data (seeded random inputs for every input)")
    name, shape = specs[0].name, tuple(specs[0].shape)
    x = eval_inputs(ds, samples, shape) if ds is not None else random_inputs(64, shape, specs[0].dtype, 0)
    if ds is not None and x[0].size != int(np.prod(shape)):
        raise UsageError(f"dataset {ds.name}: inputs of shape {list(x.shape[1:])} do not fit model input {name!r} "
                         f"of shape {list(shape)}; pass --data with inputs of the model's shape")
    more = tuple((s.name, tuple(s.shape), random_inputs(len(x), tuple(s.shape), s.dtype, seed))
                 for seed, s in enumerate(specs[1:], start=1))
    labels = Labels(ds.name, ds.y_test) if ds is not None else None
    job = BenchJob(art, target, profile.id, name, shape, x, np.empty(0), labels,
                   MeasureConfig.from_profile(profile.bench, duration_s), more)
    with OrtRunner(src.payload, profile.bench.threads) as ref:
        ref_out = run_job_inputs(ref, job)
    return dataclasses.replace(job, ref_out=ref_out)


def random_inputs(n: int, shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """``n`` seeded random evaluation inputs of one model input: normal floats, 0/1 for integer and bool inputs."""
    check_input_size((n, *shape[1:]), "model input (evaluation samples)")
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return rng.standard_normal((n, *shape[1:])).astype(dtype)
    return rng.integers(0, 2, (n, *shape[1:])).astype(dtype)


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
        if len(jobs) == 1 and not jobs[0].more_inputs:
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
        lats = measure_interleaved({job.art.key: (loaders[job.art.key], job.feed(0)) for job in jobs}, cfg)
        raw: dict[str, dict[str, Any]] = {}
        for job in jobs:
            memory = MemoryProbe()  # per job: the growth from loading this runner and running every input
            with loaders[job.art.key]() as runner:
                outputs = run_job_inputs(runner, job)
                memory.sample()
            lat = lats[job.art.key]
            raw[job.art.key] = {"latency": lat.to_json(), "samples_ms": lat.samples_ms, "outputs": outputs,
                                "memory": memory.to_json()}
        return raw


def _loader(job: BenchJob) -> RunnerFactory:
    target = get_target(job.target)
    return lambda: target.load(job.art)


def remote_job(job: BenchJob) -> BenchJob:
    """The job as a remote device runs it. A TensorRT engine is built on the device that runs it (its TensorRT,
    its GPU: a Jetson's comes from JetPack), so a "trt-engine" job ships the engine's source ONNX as a
    "trt-onnx" artifact (``TensorRTTarget.device_artifact``, in the engine's cache) and the device builds and
    caches the engine; every other job goes as it is."""
    if job.art.kind != "trt-engine":
        return job
    cache = Cache(job.art.dir.parent.parent)  # the cache holding the engine (entries lie at root/<2 hex>/<key>)
    if not cache.holds(job.art):
        raise UsageError(f"artifact {job.art.dir} lies outside an edgec cache; rebuild it")
    sent, _ = TensorRTTarget().device_artifact(source_onnx(job.art, cache), load_profile(job.profile), cache)
    return dataclasses.replace(job, art=sent)


class RpcFarm:
    """The devices registered under one key at a TVM RPC tracker (``toolchain.device.farm``). Results are keyed
    by the artifacts the jobs came with, though a TensorRT job runs as its ONNX (``remote_job``)."""

    def __init__(self, spec: RemoteSpec) -> None:
        self.spec = spec
        self.name = f"rpc://{spec.tracker_host}:{spec.tracker_port} (key {spec.key})"

    def run(self, jobs: list[BenchJob], on_event: Event | None = None) -> dict[str, dict[str, Any]]:
        for job in jobs:
            if job.more_inputs:  # the device protocol sends one input array per job
                raise UsageError(f"{job.art.key[:12]} has {1 + len(job.more_inputs)} inputs; remote benches take "
                                 "single-input models for now: bench it here, without --tracker")
        sent = {job.art.key: remote_job(job) for job in jobs}
        unique = list({job.art.key: job for job in sent.values()}.values())
        measured = bench_many(unique, self.spec, on_event)
        return {key: measured[job.art.key] for key, job in sent.items()}


def device_for(remote: RemoteSpec | None) -> Device:
    """The device a command measures on: the farm behind ``remote``, else this machine."""
    return RpcFarm(remote) if remote is not None else LocalDevice()
