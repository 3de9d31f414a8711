"""Content-addressed artifact cache with atomic writes and verified reads.

Layout: ``<root>/<key[:2]>/<key>/{<payload files>, manifest.json}``. A build writes into a temporary
directory inside the cache root and renames it into place, so a crash never leaves a half-written
artifact where a reader could find it.

Integrity: an entry is used only once its files hash to the manifest's ``content_sha256`` (checked the first
time a process uses it; ``verify`` always re-checks) and its payload name is a plain file name. A
manifest-less, unreadable or mismatching entry reads as absent and is rebuilt, the debris replaced
atomically. ``.tmp-*`` directories a killed process left behind are removed when older than
``STALE_TMP_S``. ``tuning/`` (the tuning databases) and ``.locks/`` are never touched by this cleanup.
Hashes catch corruption and debris, not someone who can write the cache: only users trusted to run code
as you may write a shared cache.

Locks: a process holds a shared ``fcntl`` lock on ``.locks/<key>`` for every entry it uses, until it
exits; ``gc`` deletes only entries whose exclusive lock it gets without waiting. A build holds an exclusive
lock on its ``.tmp-*`` directory, so debris cleanup never removes a build that is still running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.core.errors import InfraError, UsageError
from toolchain.core.versions import versions

MANIFEST = "manifest.json"
STALE_TMP_S = 600.0  # a .tmp-* build directory older than this belongs to a process that died
LOCKS = ".locks"
_KEY = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")
# Entry directories (and the content hash) this process has hashed and found matching their manifest.
_VERIFIED: set[tuple[str, str]] = set()


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


def safe_payload_name(name: object) -> bool:
    """A payload is one plain file name inside its entry: no path separator, no '..', not the manifest."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and ".." not in name
            and "\0" not in name and name != MANIFEST)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_os_error(e: OSError, root: Path) -> InfraError:
    """A write into the cache failed: say whether the disk is full or the cache is not writable."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InfraError(f"disk full writing the cache {root}; free space or point --cache-dir elsewhere")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InfraError(f"cache not writable: {root} ({e.strerror}); fix its permissions or pass --cache-dir")
    return InfraError(f"cannot write the cache {root} ({e.strerror or e}); check the disk or pass --cache-dir")


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


def _lock_dir(d: Path) -> int | None:
    """An exclusive flock on directory ``d`` itself if nobody holds it (an fd to unlock), else None."""
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    return _exclusive(fd)


def _exclusive(fd: int | None) -> int | None:
    """``fd`` with an exclusive flock taken without waiting; None (``fd`` closed) when another process holds it."""
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


Writer = Callable[[Path], tuple[str, dict[str, Any]]]
"""Writes payload file(s) into the given directory; returns (payload file name, metadata)."""


def read_manifest(d: Path) -> dict[str, Any] | None:
    """The manifest of entry directory ``d`` when it is a readable edgec manifest with a safe payload name;
    None for a missing, truncated, non-JSON or malformed one."""
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
        return None
    if not isinstance(manifest.get("content_sha256"), str) or not safe_payload_name(manifest.get("payload")):
        return None
    return manifest


class Cache:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()
        self._held: dict[str, int] = {}  # key -> fd of the shared lock this process holds on the entry
        self.remove_stale_tmp()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / key

    # -- debris and locks ---------------------------------------------------------------------------------

    def remove_stale_tmp(self, max_age_s: float = STALE_TMP_S) -> list[Path]:
        """Remove ``.tmp-*`` directories at the cache root older than ``max_age_s`` (left by killed processes).
        Nothing else is touched: not entries, not ``tuning/``, not ``.locks/``."""
        removed: list[Path] = []
        try:
            candidates = list(self.root.glob(".tmp-*")) if self.root.is_dir() else []
        except OSError:
            return removed
        now = time.time()
        for d in candidates:
            try:
                if d.is_symlink() or not d.is_dir() or now - d.lstat().st_mtime < max_age_s:
                    continue
            except OSError:
                continue
            fd = _lock_dir(d)  # a build still running (a long tuning) holds its directory's lock
            if fd is None:
                continue
            try:
                shutil.rmtree(d, ignore_errors=True)
                if not d.exists():
                    removed.append(d)
            finally:
                self.unlock(fd)
        return removed

    def _lock_path(self, key: str) -> Path:
        return self.root / LOCKS / key

    def _open_lock(self, key: str) -> int | None:
        try:
            self._lock_path(key).parent.mkdir(parents=True, exist_ok=True)
            return os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None

    def _hold(self, key: str) -> None:
        """Take (once per process) a shared lock on ``key`` so that ``gc`` leaves the entry alone while this
        process runs. Blocks only while a gc is deleting that very entry. A cache this process cannot write
        (read-only, another user's) gets no lock: nothing can gc it from here either."""
        if key in self._held:
            return
        fd = self._open_lock(key)
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            return
        with contextlib.suppress(OSError):
            os.utime(fd)  # the entry's last use, for gc --max-age-days
        self._held[key] = fd

    def try_lock_exclusive(self, key: str) -> int | None:
        """An exclusive lock on ``key`` when no process holds the entry (an fd for ``unlock``), else None."""
        return _exclusive(self._open_lock(key))

    def close(self) -> None:
        """Release the locks this Cache holds (they also go when the process exits)."""
        for fd in self._held.values():
            self.unlock(fd)
        self._held.clear()

    @staticmethod
    def unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    # -- reading ------------------------------------------------------------------------------------------

    def artifact_at(self, d: Path) -> Artifact | None:
        """The artifact described by the manifest in directory ``d`` (not verified), None if unreadable."""
        manifest = read_manifest(d)
        return Artifact(key=d.name, dir=d, manifest=manifest) if manifest is not None else None

    def get(self, key: str) -> Artifact | None:
        """The entry at ``key`` when it is intact (verified the first time this process uses it), else None:
        a missing, unreadable or tampered entry reads as absent and the next build replaces it."""
        if not _KEY.fullmatch(key) or not self.path_for(key).is_dir():
            return None
        self._hold(key)
        art = self.artifact_at(self.path_for(key))
        if art is None:
            return None
        stamp = (str(art.dir), str(art.manifest["content_sha256"]))
        if stamp not in _VERIFIED:
            if not self.verify(art):
                return None
            _VERIFIED.add(stamp)
        return art

    def find(self, prefix: str) -> Artifact | None:
        """An artifact by key or unique key prefix (at least 6 characters)."""
        if len(prefix) < 6 or not re.fullmatch(r"[0-9a-f]+", prefix):
            return None
        d = self.root / prefix[:2]
        matches = [p for p in d.glob(prefix + "*") if (p / MANIFEST).is_file()] if d.is_dir() else []
        return self.get(matches[0].name) if len(matches) == 1 else None

    def holds(self, art: Artifact) -> bool:
        """True when ``art`` is this cache's entry for its key (not a directory elsewhere, not a link out)."""
        place = self.path_for(art.key)
        try:
            return (_KEY.fullmatch(art.key) is not None and not place.is_symlink()
                    and art.dir.resolve() == place.resolve())
        except OSError:
            return False

    def verify(self, art: Artifact) -> bool:
        """True when the payload name is safe, the payload is a regular file inside the entry, and the entry's
        files still hash to the manifest's content sha256."""
        name = art.manifest.get("payload")
        if not safe_payload_name(name):
            return False
        try:
            payload = art.dir / str(name)
            if payload.is_symlink() or not payload.is_file():
                return False
            return sha256_dir(art.dir) == art.manifest.get("content_sha256")
        except OSError:
            return False

    def entry_dirs(self) -> list[Path]:
        """Every directory at an entry position (``<2 hex>/<64 hex>``), intact or not."""
        out: list[Path] = []
        if not self.root.is_dir():
            return out
        for shard in sorted(self.root.iterdir()):
            if _SHARD.fullmatch(shard.name) and shard.is_dir() and not shard.is_symlink():
                out.extend(d for d in sorted(shard.iterdir()) if _KEY.fullmatch(d.name) and d.name[:2] == shard.name)
        return out

    def entries(self) -> list[Artifact]:
        """Every entry with a readable manifest (not verified: see ``verify``)."""
        return [a for a in (self.artifact_at(d) for d in self.entry_dirs()) if a is not None]

    # -- writing ------------------------------------------------------------------------------------------

    def get_or_build(self, sk: StepKey, kind: str, write: Writer) -> tuple[Artifact, bool]:
        """Return (artifact, hit). On a miss, ``write`` fills a temp dir that is renamed into place."""
        key = sk.digest()
        found = self.get(key)
        if found is not None:
            return found, True
        return self._store(key, sk, kind, write), False

    def _new_tmp(self) -> tuple[Path, int | None]:
        """A fresh build directory and the exclusive lock that keeps debris cleanup away from it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: a shared cache follows the umask
        except OSError as e:
            raise cache_os_error(e, self.root) from None
        return tmp, _lock_dir(tmp)

    def _store(self, key: str, sk: StepKey, kind: str, write: Writer) -> Artifact:
        tmp, tmp_lock = self._new_tmp()
        try:
            return self._build(key, sk, kind, write, tmp)
        finally:
            if tmp_lock is not None:
                self.unlock(tmp_lock)

    def _build(self, key: str, sk: StepKey, kind: str, write: Writer, tmp: Path) -> Artifact:
        try:
            try:
                payload, meta = write(tmp)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise cache_os_error(e, self.root) from None
                raise
            if not safe_payload_name(payload) or not (tmp / payload).is_file():
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
            try:
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
                self._place(tmp, key)
            except OSError as e:
                raise cache_os_error(e, self.root) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        art = self.get(key)
        if art is None:
            raise InfraError(f"the cache entry {key[:12]} changed while it was written; is another tool editing "
                             f"{self.root}? rerun")
        return art

    def _place(self, tmp: Path, key: str) -> None:
        """Rename the finished ``tmp`` into the entry's place. An intact entry another process stored first wins
        (same content by construction); debris there (no or a bad manifest) is swapped out atomically."""
        final = self.path_for(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                os.rename(tmp, final)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
            existing = self.artifact_at(final)
            if existing is not None and self.verify(existing):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            debris = self.root / f".tmp-debris-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(final, debris)  # atomic: a reader sees the debris or nothing, never half of each
            except FileNotFoundError:
                continue
            if debris.is_dir() and not debris.is_symlink():
                shutil.rmtree(debris, ignore_errors=True)
            else:
                debris.unlink(missing_ok=True)
        os.rename(tmp, final)


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


# -- housekeeping: what ``edgec cache ls | verify | gc`` report and do -----------------------------------------


@dataclass(frozen=True)
class EntryInfo:
    """One directory at an entry position, as ``edgec cache ls`` lists it."""

    key: str
    dir: Path
    kind: str | None  # None: no readable manifest (debris)
    step: str | None
    profile: str | None
    size_bytes: int
    created: str | None
    last_used: float  # epoch seconds: the last time a process took the entry's lock, or its creation

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "dir": str(self.dir), "kind": self.kind, "step": self.step, "profile": self.profile,
                "size_bytes": self.size_bytes, "created": self.created,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used))}


@dataclass(frozen=True)
class GcResult:
    removed: list[EntryInfo]
    in_use: list[str]  # keys gc would have removed but a running process holds
    freed_bytes: int
    kept_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"removed": [e.to_json() for e in self.removed], "in_use": self.in_use,
                "freed_bytes": self.freed_bytes, "kept_bytes": self.kept_bytes}


def dir_size(d: Path) -> int:
    total = 0
    for p in d.rglob("*"):
        with contextlib.suppress(OSError):
            st = p.lstat()
            total += st.st_size if not p.is_dir() else 0
    return total


def entry_info(cache: Cache, d: Path) -> EntryInfo:
    manifest = read_manifest(d)
    times = []
    for p in (d, d / MANIFEST, cache.root / LOCKS / d.name):
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    m = manifest or {}
    return EntryInfo(key=d.name, dir=d, kind=m.get("kind"), step=m.get("step"), profile=m.get("profile"),
                     size_bytes=dir_size(d), created=m.get("created"), last_used=max(times, default=0.0))


def entry_problem(cache: Cache, d: Path) -> str | None:
    """Why the entry at ``d`` is not intact (None when it verifies)."""
    try:
        raw = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable manifest.json"
    if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str) or not isinstance(
            raw.get("content_sha256"), str):
        return "manifest.json is not an edgec manifest"
    if not safe_payload_name(raw.get("payload")):
        return f"payload name {str(raw.get('payload'))[:60]!r} leaves the entry"
    art = Artifact(key=d.name, dir=d, manifest=raw)
    if not cache.verify(art):
        return "content does not match its manifest sha256"
    return None


def collect_garbage(cache: Cache, max_age_s: float | None = None, max_bytes: int | None = None,
                    dry_run: bool = False) -> GcResult:
    """Remove entries unused for ``max_age_s`` and then the least recently used ones until the cache holds at most
    ``max_bytes``, plus debris (entries without a readable manifest). An entry a running process holds (its
    shared lock) is never removed: gc takes each entry's exclusive lock without waiting and skips it otherwise.
    ``tuning/`` is never touched."""
    now = time.time()
    infos = sorted((entry_info(cache, d) for d in cache.entry_dirs()), key=lambda e: e.last_used)
    doomed = [e for e in infos if e.kind is None
              or (max_age_s is not None and now - e.last_used > max_age_s)]
    total = sum(e.size_bytes for e in infos) - sum(e.size_bytes for e in doomed)
    if max_bytes is not None:
        for e in infos:
            if total <= max_bytes:
                break
            if e not in doomed:
                doomed.append(e)
                total -= e.size_bytes
    removed: list[EntryInfo] = []
    in_use: list[str] = []
    for e in doomed:
        if dry_run:
            removed.append(e)
            continue
        fd = cache.try_lock_exclusive(e.key)
        if fd is None:
            in_use.append(e.key)
            continue
        try:
            grave = cache.root / f".tmp-gc-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(e.dir, grave)  # gone for readers at once; the tree is deleted after
            except FileNotFoundError:
                continue
            except OSError as err:
                raise cache_os_error(err, cache.root) from None
            shutil.rmtree(grave, ignore_errors=True)
            removed.append(e)
        finally:
            cache.unlock(fd)
    freed = sum(e.size_bytes for e in removed)
    return GcResult(removed, in_use, freed, sum(e.size_bytes for e in infos) - freed)
