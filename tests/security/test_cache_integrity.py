"""A cache entry is used only when it is intact: tampered payloads, payload names that leave the entry, truncated
manifests and directories without a manifest read as absent and are rebuilt in place; ``.tmp-*`` debris of
killed processes is removed; ``inspect`` never loads a library that fails verification or lies outside the cache.
Every case runs the real ``edgec`` and ends with a cache that holds only verified entries."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import onnx
import pytest

from tests.fixtures.models import small_mlp
from tests.security.edgec_cli import edgec, one_line_error
from toolchain.core.cache import MANIFEST, Cache, sha256_dir
from toolchain.export import import_onnx_file


def _cached(model: Path, cache: Path) -> Path:
    """Import ``model`` into the cache here (as ``edgec export`` would) and return its entry directory."""
    art, _ = import_onnx_file(model, Cache(cache))
    return art.dir


def _export(model: Path, cache: Path, out: Path) -> dict:
    r = edgec(["export", str(model), "-o", str(out), "--json"], cache)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _only_verified(cache_root: Path) -> None:
    cache = Cache(cache_root)
    dirs = cache.entry_dirs()
    assert dirs, "no entries"
    for d in dirs:
        art = cache.artifact_at(d)
        assert art is not None and cache.verify(art), f"unverified entry left in the cache: {d}"


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    f = tmp_path / "mlp.onnx"
    onnx.save(small_mlp(dims=(16, 8, 4)), f)
    return f


def test_tampered_payload_is_rebuilt(tmp_path: Path, onnx_file: Path) -> None:
    cache = tmp_path / "cache"
    entry = _cached(onnx_file, cache)
    good = (entry / "model.onnx").read_bytes()
    onnx.save(small_mlp(seed=7, dims=(16, 8, 4)), entry / "model.onnx")  # valid, other weights: only the hash tells
    again = _export(onnx_file, cache, tmp_path / "b.onnx")
    assert again["artifact"] == entry.name and again["cache_hit"] is False
    assert (tmp_path / "b.onnx").read_bytes() == good
    _only_verified(cache)


def test_payload_name_leaving_the_entry_is_refused(tmp_path: Path, onnx_file: Path) -> None:
    cache = tmp_path / "cache"
    entry = _cached(onnx_file, cache)
    good = (entry / "model.onnx").read_bytes()
    outside = tmp_path / "x.onnx"
    onnx.save(small_mlp(seed=7, dims=(16, 8, 4)), outside)
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["payload"] = "../../../x.onnx"
    assert (entry / manifest["payload"]).resolve() == outside.resolve()
    (entry / MANIFEST).write_text(json.dumps(manifest))
    r = edgec(["inspect", entry.name[:16], "--json"], cache)
    line = one_line_error(r, 2)  # refused: the entry reads as absent
    assert entry.name[:16] in line
    line = one_line_error(edgec(["inspect", str(entry), "--json"], cache), 2)  # by path: refused as well
    assert "manifest" in line
    again = _export(onnx_file, cache, tmp_path / "b.onnx")
    assert again["cache_hit"] is False
    assert (tmp_path / "b.onnx").read_bytes() == good
    assert json.loads((entry / MANIFEST).read_text())["payload"] == "model.onnx"
    _only_verified(cache)


@pytest.mark.parametrize("damage", ["truncated", "missing", "list"])
def test_broken_manifest_is_rebuilt(tmp_path: Path, onnx_file: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    entry = _cached(onnx_file, cache)
    m = entry / MANIFEST
    if damage == "truncated":
        m.write_bytes(m.read_bytes()[:40])
    elif damage == "missing":  # an interrupted copy / rsync: files but no manifest
        m.unlink()
    else:
        m.write_text("[1, 2]")
    if damage == "truncated":  # the case that failed every run with a JSON error: as the user runs it
        again = _export(onnx_file, cache, tmp_path / "b.onnx")
        assert again["artifact"] == entry.name and again["cache_hit"] is False
    else:
        art, hit = import_onnx_file(onnx_file, Cache(cache))
        assert art.key == entry.name and not hit
    _only_verified(cache)


def test_stale_tmp_removed_fresh_and_tuning_kept(tmp_path: Path, onnx_file: Path) -> None:
    cache = tmp_path / "cache"
    holder = Cache(cache)
    stale, fresh, building = cache / ".tmp-killed", cache / ".tmp-running", cache / ".tmp-long-tuning"
    tuning = cache / "tuning" / "x86-avx512" / ".tmp-old"
    for d in (stale, fresh, building, tuning):
        d.mkdir(parents=True)
        (d / "part.bin").write_bytes(b"x" * 10)
    old = time.time() - 3600
    for d in (stale, building, tuning):
        os.utime(d, (old, old))
    lock = os.open(building, os.O_RDONLY)  # a build that has run for an hour and is still running
    fcntl.flock(lock, fcntl.LOCK_EX)
    _export(onnx_file, cache, tmp_path / "a.onnx")
    holder.unlock(lock)
    assert not stale.exists()
    assert fresh.is_dir() and building.is_dir() and tuning.is_dir()


# -- inspect never loads code it cannot trust ----------------------------------------------------------------

MARKER_LIB = r"""
#include <stdio.h>
__attribute__((constructor)) static void ran(void) {
    FILE *f = fopen("%s", "w");
    if (f) fclose(f);
}
"""


def _marker_library(tmp_path: Path, marker: Path) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the marker library")
    src = tmp_path / "marker.c"
    src.write_text(MARKER_LIB % marker)
    lib = tmp_path / "marker.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def _tvm_entry(d: Path, lib: Path, source: str = "") -> None:
    """A tvm-lib entry whose library runs a constructor when loaded (the kind ``inspect`` times kernels of)."""
    d.mkdir(parents=True)
    shutil.copy(lib, d / "model.so")
    meta = {"elf_machine": os.uname().machine, "kernels": [{"name": "fused_matmul", "kind": "generic"}],
            "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}], "source": source}
    manifest = {"key": d.name, "kind": "tvm-lib", "payload": "model.so", "content_sha256": sha256_dir(d),
                "step": "compile", "profile": "x86-avx512", "meta": meta}
    (d / MANIFEST).write_text(json.dumps(manifest))


def test_inspect_does_not_load_a_tampered_library(tmp_path: Path) -> None:
    marker = tmp_path / "LIBRARY-LOADED"
    cache = tmp_path / "cache"
    key = "ab" * 32
    _tvm_entry(Cache(cache).path_for(key), _marker_library(tmp_path, marker))
    lib = Cache(cache).path_for(key) / "model.so"
    lib.write_bytes(lib.read_bytes() + b"\0")  # the bytes no longer match the manifest
    r = edgec(["inspect", str(Cache(cache).path_for(key)), "--json"], cache)
    assert not marker.exists(), "inspect loaded a library that failed verification"
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verified"] is False and "skipped" in out["kernel_timing"]


def test_inspect_does_not_load_a_library_outside_the_cache(tmp_path: Path) -> None:
    marker = tmp_path / "LIBRARY-LOADED"
    elsewhere = tmp_path / "downloads" / ("cd" * 32)
    _tvm_entry(elsewhere, _marker_library(tmp_path, marker))
    r = edgec(["inspect", str(elsewhere), "--json"], tmp_path / "cache")
    assert not marker.exists(), "inspect loaded a library from outside the cache"
    assert r.returncode == 0, r.stderr
    assert "skipped" in json.loads(r.stdout)["kernel_timing"]


def test_inspect_truncated_manifest_is_one_line(tmp_path: Path) -> None:
    d = tmp_path / ("ef" * 32)
    d.mkdir()
    (d / MANIFEST).write_text('{"kind": "tvm-')
    line = one_line_error(edgec(["inspect", str(d)], tmp_path / "cache"), 2)
    assert "manifest" in line


def test_bench_does_not_load_a_tampered_library(tmp_path: Path, onnx_file: Path) -> None:
    marker = tmp_path / "LIBRARY-LOADED"
    cache = tmp_path / "cache"
    source = _cached(onnx_file, cache).name  # the model the library claims to be built from, intact
    key = "ab" * 32
    entry = Cache(cache).path_for(key)
    _tvm_entry(entry, _marker_library(tmp_path, marker), source=source)
    (entry / "model.so").write_bytes((entry / "model.so").read_bytes() + b"\0")
    r = edgec(["bench", str(entry), "--duration", "0.05", "--samples", "8"], cache)
    assert not marker.exists(), "bench loaded a library that failed verification"
    line = one_line_error(r, 2)
    assert "fails verification" in line


@pytest.mark.slow  # a TVM compile to kill: ~20 s
def test_killed_build_leaves_debris_the_next_run_removes(tmp_path: Path, onnx_file: Path) -> None:
    """kill -9 during a TVM compile (its build directory exists for seconds): the debris it leaves is swept once
    stale (its lock died with the process) and the rerun builds and verifies every entry."""
    import signal

    cache = tmp_path / "cache"
    args = ["compile", str(onnx_file), "--profile", "x86-avx512", "--target", "tvm", "--tune-trials", "0"]
    env = {**os.environ, "EDGEC_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    from tests.security.edgec_cli import EDGEC

    proc = subprocess.Popen([str(EDGEC), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not [d for d in cache.glob(".tmp-*") if any(d.iterdir())] and proc.poll() is None:
        assert time.monotonic() < deadline, "the compile never started a build directory"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    debris = list(cache.glob(".tmp-*"))
    if not debris:
        pytest.skip("the compile finished before it could be killed")
    old = time.time() - 3600
    for d in debris:
        os.utime(d, (old, old))
    r = edgec(args, cache)
    assert r.returncode == 0, r.stderr
    assert not list(cache.glob(".tmp-*"))
    _only_verified(cache)
