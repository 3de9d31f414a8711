"""``edgec cache ls | verify | gc``: what the artifact cache holds, whether it is intact, and making room.

gc never deletes an entry a running edgec process holds: every process takes a shared ``fcntl`` lock on each
entry it uses (``<cache>/.locks/<key>``) until it exits, and gc removes an entry only when it gets the exclusive
lock without waiting. ``tuning/`` (the tuning databases) is never touched.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from toolchain.cli.common import JsonOpt, emit, get_cache, handled
from toolchain.core.cache import collect_garbage, entry_info, entry_problem
from toolchain.core.errors import GateFailure, UsageError
from toolchain.core.text import table


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def register(app: typer.Typer) -> None:
    cache_app = typer.Typer(help="The artifact cache: list, verify and garbage-collect entries.", no_args_is_help=True)
    app.add_typer(cache_app, name="cache")

    @cache_app.command("ls")
    @handled
    def cache_ls(as_json: JsonOpt = False) -> None:
        """List cache entries: key, kind, step, profile, size, last use."""
        cache = get_cache()
        infos = [entry_info(cache, d) for d in cache.entry_dirs()]
        total = sum(e.size_bytes for e in infos)
        data = {"root": str(cache.root), "entries": [e.to_json() for e in infos], "total_bytes": total}
        emit(data, as_json, lambda: table(
            ["key", "kind", "step", "profile", "MB", "last used"],
            [[e.key[:12], e.kind or "(no manifest)", e.step or "-", e.profile or "-", _mb(e.size_bytes),
              time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))] for e in infos])
             + f"\n{len(infos)} entries, {_mb(total)} MB in {cache.root}")

    @cache_app.command("verify")
    @handled
    def cache_verify(as_json: JsonOpt = False) -> None:
        """Check every entry's files against its manifest sha256; exit 1 if any fails."""
        cache = get_cache()
        rows = [{"key": d.name, "dir": str(d), "problem": entry_problem(cache, d)} for d in cache.entry_dirs()]
        bad = [r for r in rows if r["problem"]]
        emit({"root": str(cache.root), "entries": rows, "failed": len(bad)}, as_json, lambda: "\n".join(
            [f"{r['key'][:12]}  {r['problem'] or 'ok'}" for r in rows]
            + [f"{len(rows) - len(bad)} of {len(rows)} entries verified in {cache.root}"]))
        if bad:
            raise GateFailure(f"{len(bad)} cache entr{'y' if len(bad) == 1 else 'ies'} failed verification (first: "
                              f"{bad[0]['key'][:12]}: {bad[0]['problem']}); edgec treats them as absent and the next "
                              "build that needs them rebuilds them")

    @cache_app.command("gc")
    @handled
    def cache_gc(
        max_age_days: Annotated[float | None, typer.Option(help="Remove entries unused for this many days.")] = None,
        max_size_mb: Annotated[float | None, typer.Option(
            help="Then remove the least recently used entries until the cache holds at most this many MB.")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Remove old entries (--max-age-days) or shrink the cache (--max-size-mb); entries without a readable
        manifest go too. Entries a running edgec holds are kept."""
        if max_age_days is None and max_size_mb is None:
            raise UsageError("say what to remove: --max-age-days N and/or --max-size-mb N")
        for name, v in (("--max-age-days", max_age_days), ("--max-size-mb", max_size_mb)):
            if v is not None and not 0 <= v < 1e9:
                raise UsageError(f"{name} must be a number from 0, got {v}")
        cache = get_cache()
        res = collect_garbage(cache, max_age_s=None if max_age_days is None else max_age_days * 86400,
                              max_bytes=None if max_size_mb is None else int(max_size_mb * 1e6), dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        emit({**res.to_json(), "dry_run": dry_run}, as_json, lambda: "\n".join(
            [f"{verb} {e.key[:12]}  {e.kind or '(no manifest)'}  {_mb(e.size_bytes)} MB" for e in res.removed]
            + [f"kept {k[:12]}: in use by a running edgec" for k in res.in_use]
            + [f"{verb} {len(res.removed)} entries ({_mb(res.freed_bytes)} MB); {_mb(res.kept_bytes)} MB kept"]))
