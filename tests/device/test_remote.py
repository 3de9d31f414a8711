"""Remote benchmarking through a real TVM RPC tracker and two edgec device servers (real processes on
loopback): results match the local schema, a device killed mid-run loses nothing, tokens are checked.
The attacks on the protocol are in test_device_protocol.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli import app
from tests.fixtures.device_farm import TOKEN, Farm, start_farm
from tests.fixtures.device_models import fit_linear, save
from toolchain import api
from toolchain.bench import prepare_job
from toolchain.core.cache import Cache
from toolchain.core.errors import UsageError
from toolchain.core.profile import load_profile
from toolchain.device.farm import RemoteSpec, bench_many
from toolchain.export import import_onnx_file

pytestmark = pytest.mark.rpc
KEY = "edgec-test"


@pytest.fixture(scope="module")
def farm() -> Any:
    f = start_farm(KEY, devices=2)
    yield f
    f.close()


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory, fashion: object) -> tuple[Cache, list[Any]]:
    d = tmp_path_factory.mktemp("remote")
    cache = Cache(d / "cache")
    prof = load_profile("x86-avx512")
    out = []
    for i, (hidden, target) in enumerate([(0, "tvm"), (0, "ort"), (32, "ort"), (64, "ort")]):
        src, _ = import_onnx_file(save(fit_linear(fashion, hidden=hidden, seed=i), d / f"m{i}.onnx"), cache)
        out.append(api.compile(src, profile=prof, target=target, cache=cache)[0])
    return cache, out


def spec(farm: Farm, token: str = TOKEN, **kw: Any) -> RemoteSpec:
    return RemoteSpec("127.0.0.1", farm.tracker_port, KEY, token, **kw)


def jobs(cache: Cache, arts: list[Any]) -> list[Any]:
    return [prepare_job(a, cache, data="fashion-mnist", samples=200, duration_s=0.2) for a in arts]


def test_remote_bench_cli_same_schema_as_local(farm: Farm, arts: tuple[Cache, list[Any]]) -> None:
    cache, compiled = arts
    tvm_art = compiled[0]
    base = ["--cache-dir", str(cache.root), "bench", tvm_art.key, "--data", "fashion-mnist", "--samples", "200",
            "--duration", "0.2", "--json"]
    r = CliRunner().invoke(app, [*base, "--tracker", farm.tracker, "--key", KEY, "--token", TOKEN])
    assert r.exit_code == 0, r.output
    remote = json.loads(r.output)
    local = json.loads(CliRunner().invoke(app, base).output)
    assert set(remote) == set(local) and set(remote["latency"]) == set(local["latency"])
    assert remote["device"].startswith("rpc://127.0.0.1:") and local["device"] == "local"
    assert remote["target"] == "tvm" and remote["agreement"]["argmax_agreement"] == 1.0
    assert remote["accuracy"]["task_accuracy"] == local["accuracy"]["task_accuracy"] > 0.7
    lo, hi = remote["latency"]["ci"]["p50_ms"]
    assert lo <= remote["latency"]["p50_ms"] <= hi


def test_farm_survives_a_device_killed_mid_run(farm: Farm, arts: tuple[Cache, list[Any]]) -> None:
    cache, compiled = arts
    events: list[tuple[str, str, str]] = []
    killed: list[str] = []

    def on_event(event: str, key: str, addr: str) -> None:
        events.append((event, key, addr))
        if event == "start" and not killed:
            killed.append(addr)
            farm.kill(addr)  # this device dies while it holds an artifact

    res = bench_many(jobs(cache, compiled), spec(farm, request_timeout_s=60), on_event)
    assert sorted(res) == sorted(a.key for a in compiled)  # every artifact, exactly once
    assert all(r["artifact"] == k for k, r in res.items())
    assert any(e[0] == "lost" for e in events)
    done = [e[1] for e in events if e[0] == "done"]
    assert sorted(done) == sorted(res)  # no duplicate completions
    assert all(killed[0] not in r["device"] for r in res.values())  # all work finished on the survivor


def test_wrong_token_is_refused(farm: Farm, arts: tuple[Cache, list[Any]]) -> None:
    farm.wait_devices(1)  # the kill test left one
    cache, compiled = arts
    with pytest.raises(UsageError, match="did not prove the token"):
        bench_many(jobs(cache, compiled[1:2]), spec(farm, token="not-the-token"))


def test_pick_measures_on_the_farm(farm: Farm, tmp_path: Path, fashion: object) -> None:
    m = save(fit_linear(fashion), tmp_path / "lin.onnx")
    cands = tmp_path / "c.toml"
    cands.write_text(f'[[candidate]]\nmodel = "{m}"\npasses = [[], ["cleanup"]]\ntargets = ["ort"]\n'
                     'data = "fashion-mnist"\n')
    r = CliRunner().invoke(app, ["--cache-dir", str(tmp_path / "cache"), "pick", "--profile", "x86-avx512",
                                 "--budget-ms", "5", "--candidates", str(cands), "--duration", "0.2",
                                 "--report-dir", str(tmp_path / "rep"), "--tracker", farm.tracker, "--key", KEY,
                                 "--token", TOKEN, "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["chosen"] and len(rep["candidates"]) == 2
    res = json.loads(next((tmp_path / "cache").glob("*/*/result.json")).read_text())
    assert res["device"].startswith("rpc://127.0.0.1:")
