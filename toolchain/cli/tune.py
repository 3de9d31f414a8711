"""``edgec tune``: MetaSchedule tuning for the TVM target into the profile's persistent database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from targets.base import CompileOptions, TuneOptions
from toolchain import api
from toolchain.cli.common import (
    JsonOpt,
    ProfileOpt,
    emit,
    get_cache,
    handled,
)
from toolchain.core.profile import load_profile


def register(app: typer.Typer) -> None:
    @app.command("tune")
    @handled
    def tune_cmd(
        model: Annotated[Path, typer.Argument(help="Input ONNX file.")],
        profile: ProfileOpt,
        trials: Annotated[int, typer.Option("--trials", help="Trial budget for this model (about 1-2 s per trial here).")] = 64,
        batch: Annotated[int, typer.Option("--batch", help="Candidates measured per batch; an interrupt loses at most one batch.")] = 16,
        tracker: Annotated[str | None, typer.Option("--tracker", help="HOST:PORT of a TVM RPC tracker: build candidates here, "
                                                    "upload and time each one on a device registered under --key.")] = None,
        key: Annotated[str | None, typer.Option("--key", help="Device key at the tracker (the --key of 'edgec device serve').")] = None,
        token: Annotated[str | None, typer.Option("--token", help="Device token (default $EDGEC_DEVICE_TOKEN).")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Tune MODEL's kernels (those without a hand-written kernel) and build the tuned artifact.

        Records go to <cache>/tuning/<profile>/ and are reused by every model with the same layers.
        An interrupted run keeps every finished batch: run the same command again to resume.

        Remote device (e.g. --profile rpi5): run 'edgec device serve --tracker HOST:PORT --key K' there,
        then pass --tracker HOST:PORT --key K --token T here. Candidates are built here and timed there."""

        cache = get_cache()
        prof = load_profile(profile)
        art, _ = api.import_onnx(model, cache=cache)
        tune = TuneOptions(trials=trials, trials_per_batch=batch, tracker=tracker, device_key=key, token=token,
                           progress=not as_json)
        out, hit = api.compile(art, profile=prof, target="tvm", cache=cache, options=CompileOptions(tune=tune))
        meta = out.meta
        data = {"artifact": out.key, "cache_hit": hit, "profile": prof.id, "tuning": meta.get("tuning"),
                "naive_after_tuning": meta.get("naive_after_tuning", []), "naive": meta.get("naive", []),
                "kernels": meta.get("kernels", [])}

        def human() -> str:
            t = meta.get("tuning") or {}
            untuned, naive = data["naive_after_tuning"], data["naive"]
            lines = [f"tuned tvm artifact {out.key} ({'cache hit' if hit else 'built'})",
                     (f"trials measured {t.get('measured')}, failed {t.get('failed_trials')}"
                      f"{' on the device' if t.get('remote') else ''}; database {t.get('database')}")]
            if naive:
                lines.append(f"WARNING: {len(naive)} kernel(s) stayed naive (no valid tuning record): "
                             f"{', '.join(naive)}; rerun with more --trials")
            elif untuned:
                lines.append(f"every kernel is scheduled; {len(untuned)} without a tuning record run the vector rule: "
                             f"{', '.join(untuned)} (more --trials may tune them)")
            else:
                lines.append("every kernel is scheduled")
            return "\n".join(lines)

        emit(data, as_json, human)
