"""Cache internals behind verified reads and ``edgec cache gc``: payload names, first-use verification,
debris replaced in place, and gc that never removes what another holder uses."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import toolchain.core.cache as cache_module
from toolchain.core.cache import (
    LOCKS,
    MANIFEST,
    Cache,
    StepKey,
    collect_garbage,
    entry_problem,
    read_manifest,
    safe_payload_name,
)


def _writer(text: str, name: str = "p.txt"):
    def write(d: Path) -> tuple[str, dict]:
        (d / name).write_text(text)
        return name, {}
    return write


@pytest.mark.parametrize("name, ok", [("model.onnx", True), ("../x.onnx", False), ("a/b", False), ("a\\b", False),
                                      ("..", False), ("", False), (MANIFEST, False), (5, False)])
def test_safe_payload_name(name: object, ok: bool) -> None:
    assert safe_payload_name(name) is ok


def test_unsafe_manifest_reads_as_absent(cache: Cache) -> None:
    art, _ = cache.get_or_build(StepKey("s", ("a",), {}), "text", _writer("abc"))
    m = json.loads((art.dir / MANIFEST).read_text())
    m["payload"] = "../../../etc/passwd"
    (art.dir / MANIFEST).write_text(json.dumps(m))
    assert read_manifest(art.dir) is None
    assert Cache(cache.root).get(art.key) is None
    assert "leaves the entry" in str(entry_problem(cache, art.dir))


def test_tampered_entry_is_rebuilt_in_place(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    sk = StepKey("s", ("b",), {})
    art, _ = cache.get_or_build(sk, "text", _writer("abc"))
    art.payload.write_text("abd")
    assert Cache(cache.root).get(art.key) is not None  # this process verified it already: trusted until it exits
    monkeypatch.setattr(cache_module, "_VERIFIED", set())  # as a new process sees it
    fresh = Cache(cache.root)
    assert fresh.get(art.key) is None
    rebuilt, hit = fresh.get_or_build(sk, "text", _writer("abc"))
    assert not hit and rebuilt.dir == art.dir and rebuilt.payload.read_text() == "abc"
    assert entry_problem(fresh, rebuilt.dir) is None
    assert not list(cache.root.glob(".tmp-*")), "the swapped-out debris was left behind"


def test_gc_skips_held_entries_and_removes_old_and_debris(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    builder = Cache(root)
    keys = [builder.get_or_build(StepKey("s", (n,), {}), "text", _writer(n * 1000))[0].key for n in "xyz"]
    builder.close()
    old = time.time() - 10 * 86400
    for k in keys:
        for p in (builder.path_for(k), builder.path_for(k) / MANIFEST, root / LOCKS / k):
            os.utime(p, (old, old))
    holder = Cache(root)
    assert holder.get(keys[0]) is not None  # holds keys[0] until closed
    for p in (holder.path_for(keys[0]), root / LOCKS / keys[0]):
        os.utime(p, (old, old))
    debris = builder.path_for("cd" * 32)
    debris.mkdir(parents=True)
    dry = collect_garbage(Cache(root), max_age_s=86400, dry_run=True)
    assert len(dry.removed) == 4 and all(builder.path_for(k).is_dir() for k in keys)
    res = collect_garbage(Cache(root), max_age_s=86400)
    assert res.in_use == [keys[0]]
    assert {e.key for e in res.removed} == {keys[1], keys[2], "cd" * 32}
    assert holder.get(keys[0]) is not None
    holder.close()
    assert [e.key for e in collect_garbage(Cache(root), max_bytes=0).removed] == [keys[0]]
