"""aarch64 artifacts run on aarch64: the lean device runtime under qemu-user (Debian's arm64 Python, TVM's aarch64
wheels: ``edgec device emulate``), behind a real tracker on loopback, benchmarks an ``rpi5`` fp32 library and a
``phone-arm64`` int8 library built here; their outputs agree with ONNX Runtime on x86 and every result says it
was emulated; and one tiny model of every zoo family (rpi5 fp32), two of them also as phone-arm64 int8. The default
tier runs it where the emulator is provisioned (CI: ``make emulator`` into ``$EDGEC_EMULATOR_DIR`` before
``make test``; a missing one there fails) and skips, saying how, where it is not (provisioning downloads ~150 MB
once); the slow tier provisions it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli import app
from tests.device.emulated_helpers import need_emulator, quick_job, run_emulated, start_emulated_device, zoo_onnx
from tests.fixtures.device_farm import TOKEN, Farm
from tests.fixtures.device_models import fit_linear, residual_cnn, save
from toolchain import api
from toolchain.bench import prepare_job
from toolchain.core.cache import Cache
from toolchain.core.profile import load_profile
from toolchain.device import emulate as emulator
from toolchain.device.farm import bench_many
from toolchain.device.protocol import RemoteSpec
from toolchain.export import import_onnx_file
from toolchain.report import render_bench

pytestmark = pytest.mark.rpc
KEY = "rpi5-emulated"


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    need_emulator()
    # Under the rpi5's core model (Cortex-A76, also phone-arm64's): an instruction the core lacks would crash here.
    farm = start_emulated_device(KEY, tmp_path_factory.mktemp("emulated"), cpu=emulator.qemu_cpu(load_profile("rpi5")))
    yield farm
    farm.close()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory, fashion: object) -> tuple[Cache, Any]:
    d = tmp_path_factory.mktemp("emulated-mlp")
    cache = Cache(d / "cache")
    src, _ = import_onnx_file(save(fit_linear(fashion, hidden=64), d / "mlp.onnx"), cache)
    return cache, src


def test_rpi5_fp32_runs_on_emulated_aarch64(emulated: Farm, mlp: tuple[Cache, Any]) -> None:
    cache, src = mlp
    r = run_emulated(emulated, cache, api.compile(src, profile="rpi5", target="tvm", cache=cache)[0])
    # The aarch64 library agrees with ONNX Runtime on x86 on 200 real test inputs.
    assert r["agreement"]["max_rel"] < 1e-4 and r["agreement"]["argmax_agreement"] == 1.0
    assert r["accuracy"]["task_accuracy"] == r["accuracy"]["reference_accuracy"]
    assert "emulated, not a device time" in render_bench(r)


def test_a_full_measurement_needs_only_numpy_and_tvm_there(emulated: Farm, mlp: tuple[Cache, Any]) -> None:
    """Six rounds, as a real bench measures: the device only times (its interpreter has no scipy), the statistics
    are computed on the client from the raw samples it returns."""
    cache, src = mlp
    art = api.compile(src, profile="rpi5", target="tvm", cache=cache)[0]
    job = prepare_job(art, cache, data="fashion-mnist", samples=20)
    job = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, duration_s=0.3, warmup_max_s=0.3, round_gap_s=0))
    r = bench_many([job], RemoteSpec("127.0.0.1", emulated.tracker_port, KEY, TOKEN, request_timeout_s=120))[art.key]
    assert r["latency"]["rounds"] >= 6 and r["latency"]["runs"] >= 50 and r["latency_samples_ms"]
    assert r["latency"]["ci"]["p50_ms"][0] <= r["latency"]["p50_ms"] <= r["latency"]["ci"]["p50_ms"][1]


def test_phone_int8_runs_on_emulated_aarch64(emulated: Farm, mlp: tuple[Cache, Any]) -> None:
    cache, src = mlp
    int8_onnx, _ = api.optimize(src, ["int8"], cache=cache, profile=load_profile("phone-arm64"), data="fashion-mnist")
    r = run_emulated(emulated, cache, api.compile(int8_onnx, profile="phone-arm64", target="tvm", cache=cache)[0])
    # Against ORT running the same int8 ONNX: the same argmax on >= 99 % of the inputs.
    assert r["agreement"]["argmax_agreement"] >= 0.99


@pytest.mark.slow  # MetaSchedule's builder on this 2-core machine: about 6 min for 4 trials
def test_tuning_over_rpc_on_the_emulated_device(emulated: Farm, tmp_path: Path) -> None:
    """The round trip, not the timings: aarch64 candidates built here are uploaded to, loaded and timed on the
    emulated device, and the record applies to the rpi5 build."""
    from tests.targets.tvm.test_tvm_tuning import _layernorm_model

    before = len(emulated.calls.read_text().splitlines()) if emulated.calls.is_file() else 0  # type: ignore[attr-defined]
    r = CliRunner().invoke(app, ["--cache-dir", str(tmp_path / "cache"), "tune", str(_layernorm_model(tmp_path)),
                                 "--profile", "rpi5", "--trials", "4", "--batch", "4", "--tracker", emulated.tracker,
                                 "--key", KEY, "--token", TOKEN, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    t = out["tuning"]
    assert t["remote"] is True and t["measured"] >= 1 and t["failed_trials"] < t["measured"]
    assert out["naive_after_tuning"] == [] and any(k["origin"] == "tuned" for k in out["kernels"])
    # Records timed on the emulated device have their own database; the real rpi5's stays untouched.
    assert (tmp_path / "cache" / "tuning" / "rpi5-emulated").is_dir()
    assert not (tmp_path / "cache" / "tuning" / "rpi5").exists()
    new = [json.loads(ln) for ln in emulated.calls.read_text().splitlines()[before:]]  # type: ignore[attr-defined]
    loaded = {e["file"] for e in new if e["call"] == "load_module"}
    assert len(loaded) >= t["measured"] - t["failed_trials"] and all(f.startswith("edgec-ms-") for f in loaded)


# One deployable model of every zoo family at a tiny recipe (seconds of training on a real slice of its data):
# (zoo name, recipe overrides, export form). The GNN teachers (gcn/sage) take the whole graph, not one node's
# features: their family deploys as the gnn-mlp students.
TINY_FAMILIES = {
    "mlp": ("mlp-small", {"hidden": [64], "epochs": 1, "train_limit": 2000}, "default"),
    "g2gnet": ("g2gnet", {"epochs": 1, "train_limit": 2000}, "default"),
    "kan": ("kan-fast", {"epochs": 1, "train_limit": 2000}, "default"),
    "spiking": ("snn-mlp", {"epochs": 1, "hidden": [128], "lr": 3e-3, "train_limit": 2000}, "unrolled"),
    "gnn-mlp": ("mlp-cora", {"epochs": 30}, "default"),
    "nnfactory": ("nnf-tops-s75", {"supernet_recipe": "tiny"}, "default"),
}
INT8_FAMILIES = ("mlp", "kan")


def tiny_family_model(family: str, cache: Cache, planetoid: Path | None) -> tuple[Any, str, Path | None]:
    """(the ONNX artifact of the family's tiny model, its dataset name, its data folder)."""
    from toolchain.zoo.registry import get_entry

    name, over, form = TINY_FAMILIES[family]
    if over.get("supernet_recipe") == "tiny":
        over = {"supernet_recipe": {**get_entry(name).recipe["supernet_recipe"], "stem": 32, "expert": 8,
                                    "epochs": 1, "train_limit": 2000}}
    return zoo_onnx(name, cache, planetoid, overrides=over, form=form)


@pytest.fixture(scope="module")
def family_cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return Cache(tmp_path_factory.mktemp("emulated-families") / "cache")


@pytest.fixture(scope="module")
def planetoid_or_none() -> Path | None:
    from tests.conftest import PLANETOID

    return PLANETOID if (PLANETOID / "ind.cora.x").is_file() else None


def run_family(emulated: Farm, cache: Cache, art: Any, dataset: str, data_dir: Path | None) -> dict[str, Any]:
    return run_emulated(emulated, cache, art, quick_job(art, cache, 200, dataset, data_dir))


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_every_family_rpi5_fp32_agrees_with_ort_on_emulated_aarch64(
        family: str, emulated: Farm, family_cache: Cache, planetoid_or_none: Path | None) -> None:
    if TINY_FAMILIES[family][0].endswith("-cora") and planetoid_or_none is None:
        pytest.skip("Planetoid raw files not found (../shared/data/planetoid)")
    src, dataset, data_dir = tiny_family_model(family, family_cache, planetoid_or_none)
    art = api.compile(src, profile="rpi5", target="tvm", cache=family_cache)[0]
    r = run_family(emulated, family_cache, art, dataset, data_dir)
    # The aarch64 library agrees with ONNX Runtime on x86 on 200 real test inputs.
    assert r["agreement"]["max_rel"] < 1e-4 and r["agreement"]["argmax_agreement"] == 1.0, r["agreement"]


def test_residual_cnn_with_blocked_activations_agrees_on_emulated_aarch64(emulated: Farm, family_cache: Cache,
                                                                           tmp_path: Path) -> None:
    """A ResNet-shaped CNN built for rpi5: its convs keep channel-blocked activations between them and its max pool
    runs on that layout (aarch64 NEON vectors, prefetch as PRFM); on the emulated device it agrees with ONNX
    Runtime on x86 on 200 real test images."""
    src, _ = import_onnx_file(save(residual_cnn(), tmp_path / "cnn.onnx"), family_cache)
    art = api.compile(src, profile="rpi5", target="tvm", cache=family_cache)[0]
    assert "maxpool-blocked-f32" in [k["kernel"] for k in art.meta["kernels"]]
    r = run_emulated(emulated, family_cache, art)
    assert r["agreement"]["max_rel"] < 1e-4 and r["agreement"]["argmax_agreement"] == 1.0, r["agreement"]


@pytest.mark.parametrize("family", INT8_FAMILIES)
def test_two_families_phone_int8_agree_with_ort_int8_on_emulated_aarch64(
        family: str, emulated: Farm, family_cache: Cache) -> None:
    src, dataset, data_dir = tiny_family_model(family, family_cache, None)
    int8_onnx, _ = api.optimize(src, ["int8"], cache=family_cache, profile=load_profile("phone-arm64"), data=dataset)
    art = api.compile(int8_onnx, profile="phone-arm64", target="tvm", cache=family_cache)[0]
    r = run_family(emulated, family_cache, art, dataset, data_dir)
    # Against ORT running the same int8 ONNX: the same argmax on >= 99 % of 200 real test inputs.
    assert r["agreement"]["argmax_agreement"] >= 0.99, r["agreement"]


CI_PROJECT = """
[project]
name = "emulated"
profile = "rpi5"
duration_s = 0.05
samples = 50

[remote]
tracker = "{tracker}"
key = "{key}"
request_timeout_s = 120

[[model]]
name = "linear"
source = "{source}"
data = "fashion-mnist"
target = "tvm"
budget_ms = 1000
min_accuracy = 0.5
"""


def test_ci_refuses_to_gate_on_an_emulated_latency(emulated: Farm, tmp_path: Path, fashion: object) -> None:
    src = save(fit_linear(fashion), tmp_path / "linear.onnx")
    (tmp_path / "edge.toml").write_text(CI_PROJECT.format(tracker=emulated.tracker, key=KEY, source=src))
    r = CliRunner().invoke(app, ["--cache-dir", str(tmp_path / "cache"), "ci", str(tmp_path / "edge.toml"),
                                 "--token", TOKEN])
    # A generous budget the emulator meets: still no pass, exit 2 saying why.
    assert r.exit_code == 2 and "emulated device" in r.output and "not a device time" in r.output, r.output
    rep = json.loads(next(tmp_path.rglob("ci.json")).read_text())
    assert rep["status"].startswith("refused") and rep["models"]["linear"]["result"]["emulated"] is True
    assert {g["status"] for g in rep["models"]["linear"]["gates"] if g["gate"] != "accuracy-floor"} == {"refused"}
    assert "emulated, not a device time" in next(tmp_path.rglob("summary.md")).read_text()


def test_pick_refuses_to_gate_on_an_emulated_latency(emulated: Farm, tmp_path: Path, fashion: object) -> None:
    src = save(fit_linear(fashion), tmp_path / "linear.onnx")
    cands = tmp_path / "cands.toml"
    cands.write_text(f'[[candidate]]\nmodel = "{src}"\ntargets = ["tvm"]\ndata = "fashion-mnist"\n')
    r = CliRunner().invoke(app, ["--cache-dir", str(tmp_path / "cache"), "pick", "--profile", "rpi5",
                                 "--budget-ms", "1000", "--candidates", str(cands), "--report-dir",
                                 str(tmp_path / "rep"), "--duration", "0.05", "--tracker", emulated.tracker,
                                 "--key", KEY, "--token", TOKEN])
    assert r.exit_code == 2 and "emulated device" in r.output and "not a device time" in r.output, r.output
    rep = json.loads((tmp_path / "rep" / "pick.json").read_text())
    assert rep["chosen"] is None and all(c["emulated"] for c in rep["candidates"] if "error" not in c)
    assert "emulated, not a device time" in (tmp_path / "rep" / "pick.md").read_text()


def test_emulate_refuses_a_profile_that_is_not_aarch64(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["--cache-dir", str(tmp_path / "c"), "device", "emulate", "--profile", "x86-avx512"])
    assert r.exit_code == 2 and "not aarch64" in r.output, r.output


@pytest.mark.slow  # downloads ~150 MB once (Debian arm64 packages, TVM's aarch64 wheels)
def test_emulate_provisions_the_emulator_once() -> None:
    if emulator.missing_tools():
        pytest.skip(f"no aarch64 emulation on this machine: {emulator.missing_tools()}")
    r = CliRunner().invoke(app, ["device", "emulate", "--profile", "rpi5", "--provision-only"])
    assert r.exit_code == 0, r.output
    d = Path(r.output.strip().splitlines()[-1])
    assert emulator.is_ready(d) and (d / "sysroot" / "usr" / "bin" / emulator.PYTHON).is_file()
    py = d / "sysroot" / "usr" / "bin" / emulator.PYTHON
    out = subprocess.run(["qemu-aarch64", "-L", str(d / "sysroot"), str(py), "-c",
                          "import platform; print(platform.machine())"], capture_output=True, text=True,
                         env={**os.environ, "QEMU_LD_PREFIX": str(d / "sysroot")})
    assert out.stdout.strip() == "aarch64", out.stderr
