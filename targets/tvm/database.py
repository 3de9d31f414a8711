"""The MetaSchedule database of a profile: where it lives, its content digest, applying it to a module,
and which kernels it left naive.

``<cache>/tuning/<profile>/database_{workload,tuning_record}.json`` (MetaSchedule's JSONDatabase). Records
are keyed by workload (the fused PrimFunc's structure), so a layer tuned for one model is reused by every
model with the same layer shape.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def database_dir(cache_root: Path, profile_id: str) -> Path:
    return Path(cache_root) / "tuning" / profile_id


def database_digest(db_dir: Path) -> str:
    """Content hash of a database: a tuned build's cache key changes when the database does."""
    h = hashlib.sha256()
    for name in ("database_workload.json", "database_tuning_record.json"):
        p = db_dir / name
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def open_database(db_dir: Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    db_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(str(db_dir / "database_workload.json"),
                                    str(db_dir / "database_tuning_record.json"), allow_missing=True)


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
