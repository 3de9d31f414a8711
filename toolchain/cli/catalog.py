"""``edgec profiles list | show`` and ``edgec zoo list | train``: what there is to build for and from."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from toolchain.cli.common import DataDirOpt, JsonOpt, emit, get_cache, handled
from toolchain.core.profile import all_profiles, load_profile
from toolchain.core.text import table
from toolchain.zoo.registry import entries, get_entry
from toolchain.zoo.trained import load_trained


def register(app: typer.Typer) -> None:
    profiles_app = typer.Typer(help="Device profiles (profiles/*.toml).", no_args_is_help=True)
    zoo_app = typer.Typer(help="The model zoo: list and train the seed families on real data.", no_args_is_help=True)
    app.add_typer(profiles_app, name="profiles")
    app.add_typer(zoo_app, name="zoo")

    @profiles_app.command("list")
    @handled
    def profiles_list(as_json: JsonOpt = False) -> None:
        """List device profiles."""

        profs = all_profiles()
        emit([{"id": p.id, "name": p.name, "targets": list(p.targets), "arch": p.cpu.arch} for p in profs], as_json,
             lambda: table(["id", "arch", "targets", "name"],
                           [[p.id, p.cpu.arch, ",".join(p.targets), p.name] for p in profs]))


    @profiles_app.command("show")
    @handled
    def profiles_show(name: Annotated[str, typer.Argument(help="Profile id.")], as_json: JsonOpt = False) -> None:
        """Show every field of a profile."""


        d = dataclasses.asdict(load_profile(name))
        emit(d, as_json, lambda: json.dumps(d, indent=2))


    @zoo_app.command("list")
    @handled
    def zoo_list(as_json: JsonOpt = False) -> None:
        """List zoo models."""

        es = list(entries().values())
        emit([{"name": e.name, "family": e.family, "dataset": e.dataset, "summary": e.summary,
               "forms": list(e.forms)} for e in es], as_json,
             lambda: table(["name", "family", "dataset", "summary"],
                           [[e.name, e.family, e.dataset, e.summary] for e in es]))


    @zoo_app.command("train")
    @handled
    def zoo_train(
        name: Annotated[str, typer.Argument(help="Zoo model name (edgec zoo list).")],
        data_dir: DataDirOpt = None,
        seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
        as_json: JsonOpt = False,
    ) -> None:
        """Train a zoo model on its real dataset (cached: a second run loads the weights)."""

        entry = get_entry(name)
        _m, metrics, art, hit = load_trained(entry, get_cache(), data_dir, seed=seed, progress=not as_json)
        emit({"name": name, "artifact": art.key, "cache_hit": hit, "metrics": metrics}, as_json,
             lambda: f"{name}: {metrics} ({'cache hit' if hit else 'trained'}; weights {art.payload})")
