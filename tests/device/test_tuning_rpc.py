"""Remote MetaSchedule tuning through a real TVM RPC tracker and an edgec device server (real processes on
loopback): candidates are uploaded to and timed on the device (its own log says so), records land in the
profile's database, the tuned compile applies them, and a wrong token fails in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli import app
from tests.fixtures.device_farm import TOKEN, Farm, start_farm
from tests.targets.tvm.test_tvm_tuning import _layernorm_model
from toolchain.core.errors import UsageError

pytestmark = pytest.mark.rpc
KEY = "edgec-tune-test"
PROFILE = "x86-avx512"  # host-native, so the loopback device can load what the builder links


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("device") / "device.log"
    f = start_farm(KEY, devices=1, log=log)
    f.log = log  # type: ignore[attr-defined]
    yield f
    f.close()


def _device_log(farm: Farm) -> list[dict[str, Any]]:
    log: Path = farm.log  # type: ignore[attr-defined]
    return [json.loads(ln) for ln in log.read_text().splitlines()] if log.is_file() else []


def _tune_cli(farm: Farm, model: Path, cache: Path, token: str, trials: int = 4) -> Any:
    return CliRunner().invoke(app, ["--cache-dir", str(cache), "tune", str(model), "--profile", PROFILE,
                                    "--trials", str(trials), "--batch", "4", "--tracker", farm.tracker,
                                    "--key", KEY, "--token", token, "--json"])


def test_wrong_token_fails_in_one_line_before_any_candidate(farm: Farm, tmp_path: Path) -> None:
    before = len(_device_log(farm))
    r = _tune_cli(farm, _layernorm_model(tmp_path), tmp_path / "cache", "not-the-token")
    assert r.exit_code == 2, r.output
    msg = r.output.strip().splitlines()
    assert len(msg) == 1 and "did not prove the token" in msg[0] and "--token" in msg[0], r.output
    assert len(_device_log(farm)) == before  # nothing was uploaded
    assert not (tmp_path / "cache" / "tuning" / PROFILE / "database_tuning_record.json").exists()


def test_remote_tuning_needs_a_token(farm: Farm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from targets.tvm.tuning import TuneConfig, tune

    monkeypatch.delenv("EDGEC_DEVICE_TOKEN", raising=False)
    with pytest.raises(UsageError, match="--token"):
        tune(_layernorm_model(tmp_path), PROFILE, TuneConfig(trials=4, tracker=farm.tracker, device_key=KEY),
             tmp_path / "db", progress=False)


@pytest.mark.slow  # a real MetaSchedule run: ~1-4 min on this 2-core machine, almost all of it TVM's builder
def test_candidates_are_measured_on_the_device_and_applied(farm: Farm, tmp_path: Path) -> None:
    before = len(_device_log(farm))
    cache = tmp_path / "cache"
    r = _tune_cli(farm, _layernorm_model(tmp_path), cache, TOKEN)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    t = out["tuning"]
    assert t["remote"] is True and t["measured"] >= 1 and t["failed_trials"] < t["measured"]
    assert out["naive_after_tuning"] == []  # every kernel got a schedule measured on the device

    # The device's own log: each measured candidate was uploaded and loaded in a device session process.
    new = _device_log(farm)[before:]
    loaded = {e["file"] for e in new if e["call"] == "load_module"}
    uploaded = {e["file"] for e in new if e["call"] == "upload"}
    assert len(loaded) >= t["measured"] - t["failed_trials"] >= 1
    assert loaded <= uploaded and all(f.startswith("edgec-ms-") and f.endswith(".so") for f in loaded)
    assert all(e["pid"] != os.getpid() for e in new)

    # Records with real (not failed) latencies in the profile's database.
    db = cache / "tuning" / PROFILE
    recs = [json.loads(ln) for ln in (db / "database_tuning_record.json").read_text().splitlines()]
    secs = [float(s) for rec in recs for s in (rec[1][1] or [])]
    assert secs and min(secs) < 1.0

    # A rerun resumes: the budget is met, nothing new goes to the device.
    n = len(_device_log(farm))
    again = _tune_cli(farm, _layernorm_model(tmp_path), cache, TOKEN)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["cache_hit"] is True  # same database: the same tuned artifact
    assert len(_device_log(farm)) == n


def test_cross_profile_candidates_are_aarch64_libraries() -> None:
    """For an ARM profile each candidate is cross-linked with the profile's compiler: what the device loads."""
    import shutil

    from targets.tvm.tuning import candidate_exporter
    from toolchain.core.profile import load_profile

    prof = load_profile("rpi5")
    if not shutil.which(prof.cpu.cross_cc or ""):
        pytest.skip(f"{prof.cpu.cross_cc} is not installed (apt-get install gcc-aarch64-linux-gnu)")
    import tvm
    from tvm import te

    from targets.tvm.frontend import tvm_target

    a = te.placeholder((64,), name="a")
    add = te.create_prim_func([a, te.compute((64,), lambda i: a[i] + 1.0, name="b")])
    lib = tvm.compile(tvm.IRModule({"main": add}), tvm_target(prof))
    path = Path(candidate_exporter(prof.cpu.cross_cc)(lib))
    head = path.read_bytes()[:20]
    assert path.name.startswith("edgec-ms-") and path.suffix == ".so"
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
