from __future__ import annotations

from pathlib import Path

import pytest

from toolchain.core.cache import Cache, MissingArtifact, ReadOnlyCache, StepKey


def _writer(text: str):
    def write(d: Path):
        (d / "out.txt").write_text(text)
        return "out.txt", {"n": len(text)}

    return write


def test_second_build_is_a_hit(cache: Cache) -> None:
    sk = StepKey("demo", ("in",), {"a": 1})
    a1, hit1 = cache.get_or_build(sk, "text", _writer("hello"))
    a2, hit2 = cache.get_or_build(sk, "text", _writer("SHOULD NOT RUN"))
    assert (hit1, hit2) == (False, True)
    assert a1.key == a2.key and a2.payload.read_text() == "hello"
    m = a2.manifest
    for field in ("content_sha256", "step", "config", "versions", "profile", "inputs"):
        assert field in m
    assert cache.verify(a2)


def test_key_depends_on_config_inputs_and_profile() -> None:
    base = StepKey("s", ("i",), {"a": 1}, 1, "x86-avx512")
    keys = {
        base.digest(),
        StepKey("s", ("i",), {"a": 2}, 1, "x86-avx512").digest(),
        StepKey("s", ("j",), {"a": 1}, 1, "x86-avx512").digest(),
        StepKey("s", ("i",), {"a": 1}, 2, "x86-avx512").digest(),
        StepKey("s", ("i",), {"a": 1}, 1, "rpi5").digest(),
    }
    assert len(keys) == 5
    assert StepKey("s", ("i",), {"a": 1}, 1, "x86-avx512").digest() == base.digest()


def test_failed_write_leaves_nothing(cache: Cache) -> None:
    def boom(d: Path):
        (d / "half.bin").write_bytes(b"\0" * 100)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        cache.get_or_build(StepKey("s", (), {}), "x", boom)
    leftovers = [p for p in cache.root.rglob("*")] if cache.root.exists() else []
    assert leftovers == []


def test_tampered_payload_fails_verification(cache: Cache) -> None:
    art, _ = cache.get_or_build(StepKey("s", (), {}), "text", _writer("abc"))
    art.payload.write_text("abd")
    assert not cache.verify(art)


def test_find_by_prefix(cache: Cache) -> None:
    art, _ = cache.get_or_build(StepKey("s", (), {"z": 1}), "text", _writer("abc"))
    assert cache.find(art.key[:10]).key == art.key
    assert cache.find(art.key[:3]) is None


def test_read_only_cache_answers_hits_and_never_builds(cache: Cache) -> None:
    sk = StepKey("s", (), {"a": 1})
    ro = ReadOnlyCache(cache.root)
    with pytest.raises(MissingArtifact):
        ro.get_or_build(sk, "k", _writer("x"))
    assert not cache.root.exists() or not any(cache.root.rglob("manifest.json"))
    built, _ = cache.get_or_build(sk, "k", _writer("x"))
    found, hit = ro.get_or_build(sk, "k", _writer("never called"))
    assert hit and found.key == built.key and found.payload.read_text() == "x"
