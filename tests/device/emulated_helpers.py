"""What the emulated aarch64 device tests share (test_emulated.py, test_emulated_sweep.py): starting the lean
device runtime under qemu behind a loopback tracker, the quick timing config, running one artifact there, and a
zoo model's ONNX with its trained weights."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.device_farm import TOKEN, Farm, free_port, start_tracker
from toolchain.bench import prepare_job
from toolchain.core.cache import Cache
from toolchain.device import emulate as emulator
from toolchain.device.farm import bench_many
from toolchain.device.protocol import RemoteSpec
from toolchain.measure.timing import MeasureConfig

# Under emulation a run is 10-100x slower and its time means nothing: one short round, no re-run.
QUICK = MeasureConfig(duration_s=0.05, min_runs=5, warmup_max_s=0.2, rounds=1, rerun_unstable=False)
PLANETOID_DATASETS = ("cora", "citeseer")


def need_emulator() -> None:
    why = emulator.missing_tools()
    if why:
        pytest.skip(f"no aarch64 emulation on this machine: {why}")
    if not emulator.is_ready() and os.environ.get(emulator.EMULATOR_DIR_ENV):
        # CI provisions it ('make emulator') and points the tests at it: a missing one there is a failure.
        pytest.fail(f"${emulator.EMULATOR_DIR_ENV} is set but {emulator.emulator_dir()} is not provisioned: "
                    "run 'make emulator'")
    if not emulator.is_ready():
        pytest.skip("the aarch64 emulator is not provisioned (once, a few minutes and ~150 MB of downloads): run "
                    "'edgec device emulate --profile rpi5 --provision-only' or 'make test-slow'")


def start_emulated_device(key: str, logs: Path, cpu: str = emulator.QEMU_CPU_FALLBACK) -> Farm:
    """A loopback tracker and one lean device runtime under qemu-aarch64 (CPU model ``cpu``) registered there as
    ``key``. The farm also carries ``device`` (its address) and ``calls`` (its JSON log of uploads and loads)."""
    farm = start_tracker(key, log_dir=logs)
    port = free_port()
    argv, env = emulator.runtime_command(farm.tracker, key, port, port + 1, cpu=cpu)
    addr = f"127.0.0.1:{port}"
    farm.logs[addr] = logs / "device.log"
    farm.calls = logs / "calls.jsonl"  # type: ignore[attr-defined]
    env = {**env, "EDGEC_DEVICE_TOKEN": TOKEN, "EDGEC_DEVICE_LOG": str(farm.calls)}  # type: ignore[attr-defined]
    farm.procs[addr] = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                        stderr=farm.logs[addr].open("w"))
    farm.device = addr  # type: ignore[attr-defined]
    try:
        farm.wait_devices(1, timeout=300)  # an aarch64 interpreter importing TVM under qemu: 10-60 s
    except BaseException:
        farm.close()
        raise
    return farm


def quick_job(art: Any, cache: Cache, samples: int, data: str = "fashion-mnist",
              data_dir: Path | None = None) -> Any:
    """A bench job on ``samples`` real test inputs of ``data`` whose timing is QUICK (the profile's threads)."""
    job = prepare_job(art, cache, data=data, data_dir=data_dir, samples=samples)
    return dataclasses.replace(job, cfg=dataclasses.replace(QUICK, threads=job.cfg.threads))


def run_emulated(emulated: Farm, cache: Cache, art: Any, job: Any = None, samples: int = 200,
                 request_timeout_s: float = 120) -> dict[str, Any]:
    """Bench the aarch64 library ``art`` on the emulated device (``job``, else a QUICK one on ``samples``
    Fashion-MNIST test inputs); checks it ran there, emulated, on every input, without a traceback."""
    head = art.payload.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    job = job or quick_job(art, cache, samples)
    res = bench_many([job], RemoteSpec("127.0.0.1", emulated.tracker_port, emulated.key, TOKEN,
                                       request_timeout_s=request_timeout_s))[art.key]
    assert res["emulated"] is True and res["device"].startswith(f"rpc://{emulated.device}")  # type: ignore[attr-defined]
    assert res["accuracy"]["samples"] == len(job.x) and np.isfinite(res["latency"]["p50_ms"])
    assert "Traceback" not in emulated.log_text(emulated.device)  # type: ignore[attr-defined]
    return res


def zoo_onnx(name: str, cache: Cache, planetoid: Path | None, overrides: dict[str, Any] | None = None,
             form: str | None = None, weights_cache: Cache | None = None) -> tuple[Any, str, Path | None]:
    """(the ONNX artifact of zoo model ``name`` in ``cache``, its dataset name, its data folder): its recipe with
    ``overrides``, its weights loaded from ``weights_cache`` (default ``cache``), trained there when absent;
    exported in ``form`` (default: the entry's first)."""
    from toolchain.export import export_module
    from toolchain.zoo.datasets import load_dataset
    from toolchain.zoo.registry import get_entry
    from toolchain.zoo.trained import load_trained

    e = get_entry(name)
    if overrides:
        e = dataclasses.replace(e, recipe={**e.recipe, **overrides})
    form = form or e.forms[0]
    data_dir = planetoid if e.dataset in PLANETOID_DATASETS else None
    data = load_dataset(e.dataset, data_dir)
    module, _metrics, wart, _ = load_trained(e, weights_cache or cache, data_dir, data=data, progress=False)
    exp = e.export_module(module, form) if e.export_module else module
    check: Any = data.x_test[:200].reshape(-1, *e.input_shape[1:])  # as 'edgec export' checks a zoo model
    example = None
    if e.example_inputs is not None:
        import torch

        example = e.example_inputs(module, form, torch.from_numpy(check[:1]))
        if len(example) > 1:  # every input of a multi-input form on real data
            check = tuple(t.numpy() for t in e.example_inputs(module, form, torch.from_numpy(check)))
    art, _ = export_module(exp, e.input_shape, cache, wart.key, form=form, example=example, check_inputs=check)
    return art, e.dataset, data_dir
