"""edgec ci on a small real project: pass, a blown budget (exit 1 + JUnit failure), a device stopped
mid-run (exit 3), and bad config (exit 2)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from tests.fixtures.device_farm import TOKEN, start_farm
from tests.fixtures.device_models import fit_linear, save
from toolchain.ci.run import run_ci

PROJECT = """
[project]
name = "tiny"
profile = "x86-avx512"
duration_s = 0.3
samples = 500
{extra_project}
[gates]
alpha = 0.01
min_slowdown = 0.25

{remote}
[[model]]
name = "linear"
source = "linear.onnx"
data = "fashion-mnist"
passes = ["cleanup"]
target = "ort"
budget_ms = {budget}
metric = "p90"
min_accuracy = 0.7

[[model]]
name = "wide"
source = "wide.onnx"
data = "fashion-mnist"
target = "ort"
budget_ms = 50
min_accuracy = 0.7
"""


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, fashion: object) -> Path:
    d = tmp_path_factory.mktemp("ci-models")
    save(fit_linear(fashion), d / "linear.onnx")
    save(fit_linear(fashion, hidden=256), d / "wide.onnx")
    return d


def project(models_dir: Path, tmp_path: Path, budget: float = 50.0, remote: str = "", extra: str = "") -> Path:
    for f in ("linear.onnx", "wide.onnx"):
        (tmp_path / f).write_bytes((models_dir / f).read_bytes())
    p = tmp_path / "edge.toml"
    p.write_text(PROJECT.format(budget=budget, remote=remote, extra_project=extra))
    return p


def invoke(args: list[str], cache_dir: Path) -> object:
    return CliRunner().invoke(app, ["--cache-dir", str(cache_dir), *args])


def test_example_project_passes_then_baseline_regression_gate(models_dir: Path, tmp_path: Path) -> None:
    p = project(models_dir, tmp_path)
    r = invoke(["ci", str(p), "--update-baseline"], tmp_path / "cache")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "edge-baseline.json").is_file()
    r = invoke(["ci", str(p)], tmp_path / "cache")
    assert r.exit_code == 0, r.output
    suite = ET.parse(tmp_path / "edge-reports" / "junit.xml").getroot().find("testsuite")
    names = {(tc.get("classname"), tc.get("name")) for tc in suite.iter("testcase")}
    assert ("edgec.linear", "latency-regression") in names and ("edgec.wide", "accuracy-floor") in names
    assert suite.get("failures") == "0"
    assert (tmp_path / "edge-reports" / "summary.md").read_text().count("pass") >= 4


def test_latency_regression_against_baseline_fails_with_exit_1(models_dir: Path, tmp_path: Path) -> None:
    p = project(models_dir, tmp_path)
    assert invoke(["ci", str(p), "--update-baseline"], tmp_path / "cache").exit_code == 0
    # Same model name, now a much bigger network: within budget, but clearly slower than the baseline.
    (tmp_path / "linear.onnx").write_bytes((models_dir / "wide.onnx").read_bytes())
    r = invoke(["ci", str(p)], tmp_path / "cache")
    assert r.exit_code == 1, r.output
    suite = ET.parse(tmp_path / "edge-reports" / "junit.xml").getroot().find("testsuite")
    failed = {(tc.get("classname"), tc.get("name")) for tc in suite.iter("testcase") if tc.find("failure") is not None}
    assert ("edgec.linear", "latency-regression") in failed  # (the swapped model's accuracy may differ too)
    assert {c for c, _ in failed} == {"edgec.linear"}


def test_budget_blown_fails_with_exit_1_and_junit_names_model(models_dir: Path, tmp_path: Path) -> None:
    p = project(models_dir, tmp_path, budget=0.0001)
    r = invoke(["ci", str(p)], tmp_path / "cache")
    assert r.exit_code == 1, r.output
    suite = ET.parse(tmp_path / "edge-reports" / "junit.xml").getroot().find("testsuite")
    failures = [(tc.get("classname"), f.get("message")) for tc in suite.iter("testcase") for f in tc.iter("failure")]
    assert len(failures) == 1
    cls, msg = failures[0]
    assert cls == "edgec.linear"
    assert "linear: p90" in msg and "> budget 0.0001 ms" in msg  # measured vs budgeted latency


@pytest.mark.parametrize("text, needle", [
    ("[project\nname = 1", "not valid TOML"),
    ("[project]\nname='x'\nbudgte=1\n[[model]]\nname='a'\nsource='mlp-small'\nbudget_ms=1", "unknown key"),
    ("[project]\nprofile='x86-avx512'\n[[model]]\nname='a'\nsource='mlp-small'", "budget_ms"),
    ("[project]\nprofile='x86-avx512'\n[[model]]\nname='a'\nsource='mlp-small'\nbudget_ms=1\nmetric='p42'", "metric"),
])
def test_bad_config_exits_2(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "edge.toml"
    p.write_text(text)
    r = invoke(["ci", str(p)], tmp_path / "cache")
    assert r.exit_code == 2, r.output
    assert needle in r.output


@pytest.mark.rpc
def test_device_stopped_mid_run_exits_3(models_dir: Path, tmp_path: Path) -> None:
    from toolchain.core.cache import Cache

    farm = start_farm("ci-dev", devices=1)
    try:
        remote = f'[remote]\ntracker = "{farm.tracker}"\nkey = "ci-dev"\nrequest_timeout_s = 5\n'
        p = project(models_dir, tmp_path, remote=remote)
        seen: list[str] = []

        def on_event(event: str, key: str, addr: str) -> None:
            seen.append(event)
            if event == "start" and addr in farm.procs:
                farm.kill(addr)  # the only device stops while it runs the first model

        out = run_ci(p, Cache(tmp_path / "cache"), token=TOKEN, progress=False, on_event=on_event)
        assert out.exit_code == 3
        assert "lost" in seen and out.report["infra_error"]
        junit = (tmp_path / "edge-reports" / "junit.xml").read_text()
        assert "<error" in junit and "InfraError" in junit
    finally:
        farm.close()


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ci" / "edge.toml"


def test_shipped_example_project_is_valid() -> None:
    from toolchain.ci.config import load_project

    proj = load_project(EXAMPLE)
    assert [m.name for m in proj.models] == ["mlp-small", "mlp-small-int8"]
    assert proj.baseline.name == "edge-baseline.json"


@pytest.mark.slow
def test_shipped_example_project_passes(tmp_path: Path) -> None:
    import shutil

    shutil.copy(EXAMPLE, tmp_path / "edge.toml")
    r = invoke(["ci", str(tmp_path / "edge.toml")], tmp_path / "cache")
    assert r.exit_code == 0, r.output
