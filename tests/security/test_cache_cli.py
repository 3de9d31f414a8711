"""``edgec cache ls | verify | gc`` on a real cache: listing with kinds and sizes, verification that names the
broken entry and exits 1, and gc by age or size that never removes an entry a running process holds nor the
tuning databases."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.security.edgec_cli import edgec, one_line_error
from toolchain.core.cache import LOCKS, MANIFEST, Cache, StepKey


def _entry(cache: Cache, name: str, size: int) -> str:
    def write(d: Path) -> tuple[str, dict]:
        (d / "blob.bin").write_bytes(os.urandom(size))
        return "blob.bin", {"name": name}

    art, _ = cache.get_or_build(StepKey("test:blob", (name,), {}), "blob", write)
    return art.key


def _age(cache: Cache, key: str, days: float) -> None:
    t = time.time() - days * 86400
    for p in (cache.path_for(key), cache.path_for(key) / MANIFEST, cache.root / LOCKS / key):
        if p.exists():
            os.utime(p, (t, t))


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Cache, dict[str, str]]:
    cache = Cache(tmp_path / "cache")
    keys = {name: _entry(cache, name, size) for name, size in (("old", 300_000), ("mid", 200_000), ("new", 100_000))}
    cache.close()  # built, not in use any more
    _age(cache, keys["old"], 30)
    _age(cache, keys["mid"], 3)
    tuning = cache.root / "tuning" / "x86-avx512"
    tuning.mkdir(parents=True)
    (tuning / "database_tuning_record.json").write_text("{}\n")
    return cache, keys


def test_ls_and_verify(filled: tuple[Cache, dict[str, str]]) -> None:
    cache, keys = filled
    r = edgec(["cache", "ls", "--json"], cache.root)
    assert r.returncode == 0, r.stderr
    listed = {e["key"]: e for e in json.loads(r.stdout)["entries"]}
    assert set(listed) == set(keys.values())
    assert listed[keys["old"]]["kind"] == "blob" and listed[keys["old"]]["size_bytes"] > 300_000
    assert edgec(["cache", "verify"], cache.root).returncode == 0
    blob = cache.path_for(keys["mid"]) / "blob.bin"
    blob.write_bytes(blob.read_bytes()[:-1] + b"?")
    r = edgec(["cache", "verify", "--json"], cache.root)
    line = one_line_error(r, 1)
    assert keys["mid"][:12] in line and "sha256" in line
    assert [e["key"] for e in json.loads(r.stdout)["entries"] if e["problem"]] == [keys["mid"]]


def test_gc_by_age_keeps_held_entries_and_tuning(filled: tuple[Cache, dict[str, str]]) -> None:
    cache, keys = filled
    holder = Cache(cache.root)  # this process uses "mid" (a shared lock until the Cache is gone)
    assert holder.get(keys["mid"]) is not None
    _age(cache, keys["mid"], 3)
    debris = cache.path_for("ab" * 32)
    debris.mkdir(parents=True)
    (debris / "half.bin").write_bytes(b"x")  # an interrupted copy: no manifest
    r = edgec(["cache", "gc", "--max-age-days", "1", "--json"], cache.root)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {e["key"] for e in res["removed"]} == {keys["old"], "ab" * 32}
    assert res["in_use"] == [keys["mid"]]
    assert not cache.path_for(keys["old"]).exists() and not debris.exists()
    assert cache.path_for(keys["mid"]).is_dir() and cache.path_for(keys["new"]).is_dir()
    assert (cache.root / "tuning" / "x86-avx512" / "database_tuning_record.json").is_file()


def test_gc_to_size_removes_least_recently_used(filled: tuple[Cache, dict[str, str]]) -> None:
    cache, keys = filled
    r = edgec(["cache", "gc", "--max-size-mb", "0.25", "--json"], cache.root)
    assert r.returncode == 0, r.stderr
    assert [e["key"] for e in json.loads(r.stdout)["removed"]] == [keys["old"], keys["mid"]]
    assert cache.path_for(keys["new"]).is_dir()
    assert (cache.root / "tuning" / "x86-avx512" / "database_tuning_record.json").is_file()


def test_gc_needs_a_limit(tmp_path: Path) -> None:
    line = one_line_error(edgec(["cache", "gc"], tmp_path / "cache"), 2)
    assert "--max-age-days" in line
