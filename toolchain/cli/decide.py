"""``edgec pick`` and ``edgec ci``: decisions over measured candidates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toolchain.ci.run import render_summary, run_ci
from toolchain.cli.common import (
    DataDirOpt,
    JsonOpt,
    KeyOpt,
    TokenOpt,
    TrackerOpt,
    emit,
    get_cache,
    handled,
)
from toolchain.device.protocol import RemoteSpec, token_from_env
from toolchain.pick import PickConfig, render_markdown, run_pick


def register(app: typer.Typer) -> None:
    @app.command()
    @handled
    def pick(
        profile: Annotated[str, typer.Option("--profile", "-p", help="Device profile id.")],
        budget_ms: Annotated[float, typer.Option("--budget-ms", help="Latency budget in milliseconds.")],
        metric: Annotated[str, typer.Option("--metric", help="p50 | p90 | p99.")] = "p90",
        min_accuracy: Annotated[float | None, typer.Option("--min-accuracy", help="Accuracy floor (0-1).")] = None,
        candidates: Annotated[str, typer.Option("--candidates", help="'zoo' or a TOML file of candidates.")] = "zoo",
        task: Annotated[str, typer.Option("--task", help="With --candidates zoo: the dataset whose models compete "
                                          "(fashion-mnist, cora, citeseer, ...).")] = "fashion-mnist",
        report_dir: Annotated[Path, typer.Option("--report-dir", help="Where pick.json/.md/.png go.")] = Path("reports/pick"),
        verify: Annotated[int, typer.Option("--verify", help="Re-measure the chosen model N times.")] = 0,
        duration: Annotated[float | None, typer.Option("--duration", help="Seconds of timed runs per candidate.")] = None,
        tracker: TrackerOpt = None,
        key: KeyOpt = None,
        token: TokenOpt = None,
        data_dir: DataDirOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Choose the most accurate model whose latency is within the budget with 95 % confidence."""

        remote = RemoteSpec.parse(tracker, key or profile, token_from_env(token)) if tracker else None
        cfg = PickConfig(profile=profile, budget_ms=budget_ms, metric=metric, min_accuracy=min_accuracy,
                         candidates=candidates, report_dir=report_dir, verify=verify, duration_s=duration,
                         data_dir=data_dir, remote=remote, task=task)
        rep = run_pick(cfg, get_cache(), progress=not as_json)
        emit(rep, as_json, lambda: render_markdown(rep))

    @app.command()
    @handled
    def ci(
        project: Annotated[Path, typer.Argument(help="The project file, e.g. edge.toml.")],
        update_baseline: Annotated[bool, typer.Option("--update-baseline", help="Write the measured results as the new baseline.")] = False,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Build, measure and gate every model of a project; JSON, JUnit XML and markdown reports.
        Exit 0 all gates pass, 1 a gate failed, 2 config error, 3 SDK or device unavailable."""

        outcome = run_ci(project, get_cache(), update_baseline=update_baseline, token=token,
                         progress=not as_json)
        emit(outcome.report, as_json, lambda: render_summary(outcome.report))
        if outcome.exit_code:
            raise typer.Exit(outcome.exit_code)
