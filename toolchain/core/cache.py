"""Content-addressed artifact cache with atomic writes.

Layout: ``<root>/<key[:2]>/<key>/{<payload files>, manifest.json}``. A build writes into a temporary
directory inside the cache root and renames it into place, so a crash never leaves a half-written
artifact where a reader could find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.core.errors import UsageError
from toolchain.core.versions import versions

MANIFEST = "manifest.json"


def default_cache_root() -> Path:
    return Path(os.environ.get("EDGEC_CACHE") or Path.home() / ".cache" / "edgec")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: Path) -> str:
    """Hash of every file's relative name and content under ``path`` (manifest excluded)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            h.update(str(p.relative_to(path)).encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """One stage output: a payload file inside a cache directory, described by its manifest."""

    key: str
    dir: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def payload(self) -> Path:
        return self.dir / str(self.manifest["payload"])

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.manifest.get("meta", {}))

    @property
    def profile(self) -> str | None:
        return self.manifest.get("profile")


@dataclass(frozen=True)
class StepKey:
    """Everything that determines a step's output; its sha256 is the artifact key."""

    step: str
    inputs: tuple[str, ...]
    config: dict[str, Any]
    config_version: int = 1
    profile: str | None = None

    def digest(self) -> str:
        material = {
            "step": self.step,
            "inputs": list(self.inputs),
            "config": self.config,
            "config_version": self.config_version,
            "profile": self.profile,
            "versions": versions(),
        }
        return hashlib.sha256(canonical_json(material).encode()).hexdigest()


Writer = Callable[[Path], tuple[str, dict[str, Any]]]
"""Writes payload file(s) into the given directory; returns (payload file name, metadata)."""


class Cache:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> Artifact | None:
        d = self.path_for(key)
        m = d / MANIFEST
        if not m.is_file():
            return None
        manifest = json.loads(m.read_text())
        return Artifact(key=key, dir=d, manifest=manifest)

    def find(self, prefix: str) -> Artifact | None:
        """An artifact by key or unique key prefix (at least 6 characters)."""
        if len(prefix) < 6:
            return None
        d = self.root / prefix[:2]
        matches = [p for p in d.glob(prefix + "*") if (p / MANIFEST).is_file()] if d.is_dir() else []
        return self.get(matches[0].name) if len(matches) == 1 else None

    def get_or_build(self, sk: StepKey, kind: str, write: Writer) -> tuple[Artifact, bool]:
        """Return (artifact, hit). On a miss, ``write`` fills a temp dir that is renamed into place."""
        key = sk.digest()
        found = self.get(key)
        if found is not None:
            return found, True
        return self._store(key, sk, kind, write), False

    def _store(self, key: str, sk: StepKey, kind: str, write: Writer) -> Artifact:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            payload, meta = write(tmp)
            if not (tmp / payload).exists():
                raise UsageError(f"internal: step {sk.step} did not write its payload {payload}")
            manifest = {
                "key": key,
                "kind": kind,
                "payload": payload,
                "content_sha256": sha256_dir(tmp),
                "step": sk.step,
                "inputs": list(sk.inputs),
                "config": sk.config,
                "config_version": sk.config_version,
                "profile": sk.profile,
                "versions": versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "meta": meta,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            final = self.path_for(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process stored the same key first: the content is identical by construction.
                if not (final / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        art = self.get(key)
        assert art is not None
        return art

    def verify(self, art: Artifact) -> bool:
        """True when the payload on disk still hashes to the manifest's content sha256."""
        return sha256_dir(art.dir) == art.manifest.get("content_sha256")

    def entries(self) -> list[Artifact]:
        out = []
        if self.root.is_dir():
            for m in self.root.glob("*/*/" + MANIFEST):
                out.append(Artifact(key=m.parent.name, dir=m.parent, manifest=json.loads(m.read_text())))
        return out


class MissingArtifact(LookupError):
    """A ReadOnlyCache was asked for a step it does not hold."""


class ReadOnlyCache(Cache):
    """A cache that answers from what is stored and never runs a step: ``get_or_build`` raises
    MissingArtifact on a miss. Lets a caller ask "is this already trained/compiled?" through the
    same code path that would build it, so the key is never re-derived by hand."""

    def get_or_build(self, sk: StepKey, kind: str, write: Writer) -> tuple[Artifact, bool]:
        found = self.get(sk.digest())
        if found is None:
            raise MissingArtifact(f"{sk.step} not in the cache at {self.root}")
        return found, True
