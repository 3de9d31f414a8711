"""The edgec command as a user runs it: real subprocesses, exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.fixtures.models import small_cnn, small_mlp

EDGEC = [sys.executable, "-m", "cli"]
REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], cache: Path, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEC_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([*EDGEC, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600, **kw)


def cache_entries(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


COMMANDS = ["export", "optimize", "compile", "bench", "build", "inspect", "passes", "demo",
            "profiles list", "profiles show", "zoo list", "zoo train"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(tmp_path: Path, cmd: str) -> None:
    r = run([*cmd.split(), "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


def test_profiles_json(tmp_path: Path) -> None:
    r = run(["profiles", "list", "--json"], tmp_path)
    ids = {p["id"] for p in json.loads(r.stdout)}
    assert {"x86-avx512", "rpi5", "jetson-agx-orin"} <= ids
    r = run(["profiles", "show", "rpi5", "--json"], tmp_path)
    assert json.loads(r.stdout)["cpu"]["mcpu"] == "cortex-a76"


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_corrupt_onnx_one_line_no_cache_litter(tmp_path: Path) -> None:
    f = tmp_path / "bad.onnx"
    data = small_mlp().SerializeToString()
    f.write_bytes(data[: len(data) // 2])
    cache = tmp_path / "cache"
    r = run(["build", str(f), "--profile", "x86-avx512"], cache)
    assert r.returncode == 2
    assert "bad.onnx" in _one_line_error(r)
    assert cache_entries(cache) == []


def test_unknown_profile(tmp_path: Path) -> None:
    f = tmp_path / "m.onnx"
    onnx.save_model(small_mlp(), f)
    cache = tmp_path / "cache"
    r = run(["build", str(f), "--profile", "nokia-3310"], cache)
    assert r.returncode == 2 and "unknown profile" in _one_line_error(r)
    assert cache_entries(cache) == []


def test_unknown_pass(tmp_path: Path) -> None:
    f = tmp_path / "m.onnx"
    onnx.save_model(small_mlp(), f)
    cache = tmp_path / "cache"
    r = run(["build", str(f), "--profile", "x86-avx512", "--pass", "turbo"], cache)
    assert r.returncode == 2 and "unknown pass 'turbo'" in _one_line_error(r)
    r = run(["optimize", str(f), "--pass", "turbo"], cache)
    assert r.returncode == 2
    assert cache_entries(cache) == []
    r = run(["optimize", str(f), "--pass", "cleanup=fold_constants=maybe"], cache)
    assert r.returncode == 2 and "fold_constants" in _one_line_error(r)


def test_missing_sdk_is_exit_3(tmp_path: Path) -> None:
    f = tmp_path / "m.onnx"
    onnx.save_model(small_mlp(), f)
    r = run(["compile", str(f), "--profile", "jetson-orin-nano", "--target", "tensorrt"], tmp_path / "c")
    if r.returncode == 0:
        pytest.skip("TensorRT and a GPU are present")
    assert r.returncode == 3 and "NVIDIA GPU" in _one_line_error(r)


def test_build_user_cnn_both_targets_json(tmp_path: Path) -> None:
    """A user's ONNX CNN on both targets, within 1e-4 of ONNX Runtime, JSON fields."""
    f = tmp_path / "cnn.onnx"
    onnx.save_model(small_cnn(), f)
    cache = tmp_path / "cache"
    r = run(["build", str(f), "--profile", "x86-avx512", "--target", "ort", "--target", "tvm",
             "--pass", "cleanup", "--duration", "0.3", "--json"], cache)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert set(rep["targets"]) == {"ort", "tvm"}
    for t in ("ort", "tvm"):
        res = rep["targets"][t]
        for k in ("p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "runs", "threads"):
            assert k in res["latency"]
        assert res["latency"]["runs"] >= 50
        assert res["agreement"]["max_rel"] <= 1e-4
        assert res["agreement"]["argmax_agreement"] == 1.0
        lo, hi = res["latency"]["ci"]["p50_ms"]
        assert 0 < lo <= res["latency"]["p50_ms"] <= hi and isinstance(res["latency"]["stable"], bool)
    assert "onnxruntime" in rep["environment"]["versions"] and rep["environment"]["cpu"]
    # Second build: every stage is a cache hit.
    r2 = run(["build", str(f), "--profile", "x86-avx512", "--target", "ort", "--target", "tvm",
              "--pass", "cleanup", "--duration", "0.2", "--json"], cache)
    rep2 = json.loads(r2.stdout)
    assert all(rep2["cache_hits"].values()), rep2["cache_hits"]


def test_compile_then_bench_then_inspect(tmp_path: Path) -> None:
    f = tmp_path / "mlp.onnx"
    onnx.save_model(small_mlp(), f)
    cache = tmp_path / "cache"
    r = run(["compile", str(f), "--profile", "x86-avx512", "--target", "tvm", "--json"], cache)
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)["artifact"]
    r = run(["bench", key[:16], "--duration", "0.2", "--json"], cache)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["target"] == "tvm" and res["agreement"]["max_rel"] <= 1e-4
    r = run(["inspect", key, "--json"], cache)
    info = json.loads(r.stdout)
    assert info["verified"] and info["kernels"]
    r = run(["inspect", str(f), "--json"], cache)
    assert json.loads(r.stdout)["coverage"]["tvm"]["complete"]
    r = run(["bench", "0000000000dead"], cache)
    assert r.returncode == 2 and "no artifact" in _one_line_error(r)
