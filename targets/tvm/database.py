"""The MetaSchedule database of a profile: where it lives, its content digest, applying it to a module,
and which kernels it left naive.

``<cache>/tuning/<profile>/database_{workload,tuning_record}.json`` (MetaSchedule's JSONDatabase). Records
are keyed by workload (the fused PrimFunc's structure), so a layer tuned for one model is reused by every
model with the same layer shape.

``kernel_choices.json`` next to them: per conv layer (``kernels.tvm.passes.substitute_conv.conv_layer_key``), the
tuned schedule's and the hand-written kernel's time measured interleaved after tuning, and which one the build
keeps (``origin``: "tuned" or "hand"). A choice is kept only for the hand-written kernel sources it was measured
against: editing the conv kernel makes every layer hand-written again until tuning measures them anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import kernels.tvm.passes.substitute_conv as substitute_conv_module
import kernels.tvm.tir.conv2d as conv2d_kernel_module
from toolchain.core.errors import InfraError

WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"
CHOICES = "kernel_choices.json"


def conv_kernel_digest() -> str:
    """Hash of the direct conv kernel's sources: the hand-written side of every recorded choice."""
    h = hashlib.sha256()
    for mod in (conv2d_kernel_module, substitute_conv_module):
        h.update(Path(str(mod.__file__)).read_bytes())
    return h.hexdigest()[:16]


def kernel_choices(db_dir: Path) -> dict[str, dict[str, Any]]:
    """Layer key -> {origin, hand_us, tuned_us, ...} for the choices measured against the current conv kernel."""
    path = Path(db_dir) / CHOICES
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("kernel_sources") != conv_kernel_digest():
        return {}
    layers = data.get("layers")
    return {str(k): dict(v) for k, v in layers.items() if isinstance(v, dict)} if isinstance(layers, dict) else {}


def record_kernel_choices(db_dir: Path, choices: dict[str, dict[str, Any]]) -> None:
    """Merge ``choices`` into the database's kernel choices (written atomically)."""
    merged = {**kernel_choices(db_dir), **choices}
    Path(db_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(db_dir) / f".{CHOICES}.tmp"
    tmp.write_text(json.dumps({"kernel_sources": conv_kernel_digest(), "layers": merged}, indent=1, sort_keys=True))
    os.replace(tmp, Path(db_dir) / CHOICES)


def tuned_conv_layers(db_dir: Path) -> frozenset[str]:
    """The conv layers whose tuned schedule measured faster than the hand-written kernel."""
    return frozenset(k for k, v in kernel_choices(db_dir).items() if v.get("origin") == "tuned")


def database_dir(cache_root: Path, profile_id: str) -> Path:
    return Path(cache_root) / "tuning" / profile_id


def database_digest(db_dir: Path) -> str:
    """Content hash of a database: a tuned build's cache key changes when the database does."""
    h = hashlib.sha256()
    for name in (WORKLOADS, RECORDS, CHOICES):
        p = db_dir / name
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _json_lines(path: Path) -> list[tuple[str, Any]]:
    """(line, parsed value or None where the line is not JSON) for every non-empty line of ``path``."""
    if not path.is_file():
        return []
    out: list[tuple[str, Any]] = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            out.append((line, None))
    return out


def repair_database(db_dir: Path) -> int:
    """Drop the torn or corrupt lines of a database (a tuning process killed mid-write, a damaged disk): a workload
    line that is not a JSON list, a record that is not ``[workload index, {...}]`` or names a dropped or missing
    workload. Record indices are renumbered to the kept workloads; the files are rewritten atomically only when
    something was dropped. Returns how many lines were dropped."""
    workloads, records = _json_lines(db_dir / WORKLOADS), _json_lines(db_dir / RECORDS)
    index: dict[int, int] = {}
    kept_workloads: list[str] = []
    for i, (line, value) in enumerate(workloads):
        if isinstance(value, list) and value:
            index[i] = len(kept_workloads)
            kept_workloads.append(line)
    kept_records: list[str] = []
    for line, value in records:
        ok = (isinstance(value, list) and len(value) >= 2 and isinstance(value[0], int)
              and not isinstance(value[0], bool) and value[0] in index and isinstance(value[1], (dict, list)))
        if ok:
            kept_records.append(line if index[value[0]] == value[0] else json.dumps([index[value[0]], *value[1:]]))
    dropped = len(workloads) - len(kept_workloads) + len(records) - len(kept_records)
    if dropped:
        for name, lines in ((WORKLOADS, kept_workloads), (RECORDS, kept_records)):
            tmp = db_dir / f".{name}.repair"
            tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
            os.replace(tmp, db_dir / name)
    return dropped


def open_database(db_dir: Path) -> Any:
    """The profile's MetaSchedule database, its torn or corrupt lines dropped first (reported on stderr)."""
    from tvm.s_tir import meta_schedule as ms

    db_dir.mkdir(parents=True, exist_ok=True)
    dropped = repair_database(db_dir)
    if dropped:
        print(f"edgec: warning: tuning database {db_dir}: skipped {dropped} torn or corrupt line(s); "
              "those layers are tuned again when asked", file=sys.stderr)
    try:
        return ms.database.JSONDatabase(str(db_dir / WORKLOADS), str(db_dir / RECORDS), allow_missing=True)
    except Exception as e:  # noqa: BLE001 -- well-formed JSON that MetaSchedule still cannot read
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise InfraError(f"tuning database {db_dir} cannot be read ({first}); move it aside and tune again") from None


def apply_database(mod: Any, target: Any, db_dir: Path) -> Any:
    """``mod`` with every PrimFunc the database has a schedule for replaced by its best schedule."""
    from tvm import relax

    db = open_database(db_dir)
    with target, db:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def naive_kernels(mod: Any) -> list[str]:
    """PrimFuncs left unscheduled (no hand-written kernel, no tuned schedule): they run naive loops."""
    import tvm

    out = []
    for gv, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            attrs = f.attrs or {}
            if not bool(attrs.get("tirx.is_scheduled", False)):
                out.append(gv.name_hint)
    return sorted(out)
