"""The lean device runtime runs where only the standard library, numpy, TVM (and onnxruntime) exist: it is
started in an interpreter whose ``sitecustomize`` makes torch, onnx, the compiler side of edgec and its CLI
unimportable (as on a Raspberry Pi with only ``pip install numpy apache-tvm``), and a real TVM library and an
ONNX Runtime model are benchmarked through it over the authenticated protocol."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.device_farm import REPO, TOKEN, Farm, start_tracker
from tests.fixtures.device_models import fit_linear, save
from toolchain import api
from toolchain.bench import prepare_job
from toolchain.core.cache import Cache
from toolchain.core.profile import load_profile
from toolchain.device.farm import bench_many
from toolchain.device.protocol import RemoteSpec
from toolchain.export import import_onnx_file

pytestmark = pytest.mark.rpc
KEY = "edgec-lean"
# What a device does not have: torch, the ONNX tooling, scipy, and every part of edgec above the device runtime.
NOT_ON_THE_DEVICE = ("torch", "onnx", "onnxscript", "onnx_ir", "scipy", "typer", "tqdm", "matplotlib", "xgboost", "cli",
                     "targets", "kernels", "profiles", "toolchain.api", "toolchain.bench", "toolchain.pipeline",
                     "toolchain.cli", "toolchain.zoo", "toolchain.passes", "toolchain.export",
                     "toolchain.core.cache", "toolchain.core.onnx_io", "toolchain.core.profile",
                     "toolchain.device.server", "toolchain.device.farm", "toolchain.device.session",
                     "toolchain.measure.job", "toolchain.measure.compare")

SITECUSTOMIZE = f'''
import sys

BLOCKED = {NOT_ON_THE_DEVICE!r}


class NotOnTheDevice:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is not installed on this device")
        return None


sys.meta_path.insert(0, NotOnTheDevice())
'''


@pytest.fixture(scope="module")
def device_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("device-site")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, device_site: Path) -> Any:
    f = start_tracker(KEY, log_dir=tmp_path_factory.mktemp("lean"))
    try:
        f.lean = f.add_device(lean=True, env={"PYTHONPATH": str(device_site)})  # type: ignore[attr-defined]
        f.wait_devices(1)
    except BaseException:
        f.close()
        raise
    yield f
    f.close()


def test_the_blocker_blocks(device_site: Path) -> None:
    """The isolation the device runs in is real: torch and edgec's compiler side do not import there, the
    device runtime does."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(REPO), str(device_site)))}
    for mod in ("torch", "onnx", "toolchain.core.cache", "targets"):
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], env=env, capture_output=True, text=True)
        assert r.returncode != 0 and "not installed on this device" in r.stderr, (mod, r.stderr[-500:])
    r = subprocess.run([sys.executable, "-c", "import sys, toolchain.device.runtime as r; "
                        "print(sorted(k for k in r.available_runners()))"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "tvm-lib" in r.stdout, r.stderr[-2000:]


def test_bench_through_the_lean_runtime(farm: Farm, tmp_path: Path, fashion: object) -> None:
    cache = Cache(tmp_path / "cache")
    prof = load_profile("x86-avx512")
    src, _ = import_onnx_file(save(fit_linear(fashion), tmp_path / "lin.onnx"), cache)
    arts = [api.compile(src, profile=prof, target=t, cache=cache)[0] for t in ("tvm", "ort")]
    jobs = [prepare_job(a, cache, data="fashion-mnist", samples=200, duration_s=0.2) for a in arts]
    res = bench_many(jobs, RemoteSpec("127.0.0.1", farm.tracker_port, KEY, TOKEN, request_timeout_s=60))
    for a in arts:
        r = res[a.key]
        assert r["device"].startswith(f"rpc://{farm.lean}")  # type: ignore[attr-defined]
        assert r["agreement"]["argmax_agreement"] == 1.0 and r["agreement"]["max_rel"] < 1e-4
        assert r["accuracy"]["task_accuracy"] > 0.7
        assert r["latency"]["runs"] >= 50 and np.isfinite(r["latency"]["p50_ms"])
        assert "emulated" not in r
    t_end = time.monotonic() + 10  # the device logs a session once its process has been reaped
    while (log := farm.log_text(farm.lean)).count(" done") < 2 and time.monotonic() < t_end:  # type: ignore[attr-defined]
        time.sleep(0.1)
    assert log.count(" done") == 2 and "Traceback" not in log, log  # two clean sessions


def test_the_runtime_exits_non_zero_only_when_it_cannot_serve(device_site: Path) -> None:
    import socket

    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(REPO), str(device_site)))}
    env.pop("EDGEC_DEVICE_TOKEN", None)
    cmd = [sys.executable, "-m", "toolchain.device.runtime", "--key", KEY]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a shared token" in r.stderr, r.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        r = subprocess.run([*cmd, "--token", TOKEN, "--port", port, "--port-end", port], env=env, capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 3 and r.stderr.strip().splitlines() == [
        f"error: cannot bind to any port in [{port}, {port}) on 127.0.0.1; pick a free --port"], r.stderr
