"""``edgec device serve``, ``edgec pick`` and ``edgec ci`` (issue 6)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from toolchain.cli_support import DataDirOpt, JsonOpt, emit, get_cache, handled

TokenOpt = Annotated[str | None, typer.Option("--token", help="Shared device token (default $EDGEC_DEVICE_TOKEN).")]


def register(app: typer.Typer) -> None:
    device_app = typer.Typer(help="Run this machine as a benchmark device behind a TVM RPC tracker.",
                             no_args_is_help=True)
    app.add_typer(device_app, name="device")

    @device_app.command("serve")
    @handled
    def serve(
        key: Annotated[str, typer.Option("--key", help="Device key clients request, e.g. the profile id.")],
        tracker: Annotated[str | None, typer.Option("--tracker", help="HOST:PORT of the TVM RPC tracker.")] = None,
        token: TokenOpt = None,
        host: Annotated[str, typer.Option("--host", help="Address to bind; loopback unless you say otherwise.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="First port to try.")] = 9090,
        port_end: Annotated[int, typer.Option("--port-end", help="Last port to try (exclusive).")] = 9199,
    ) -> None:
        """Serve benchmarks for edgec clients (TVM libraries, ONNX Runtime models, TensorRT engines)."""
        from toolchain.remote import RemoteSpec
        from toolchain.remote_server import TOKEN_ENV
        from toolchain.remote_server import serve as run_server

        token = token or os.environ.get(TOKEN_ENV)
        addr = None
        if tracker:
            spec = RemoteSpec.parse(tracker, key, token or "-")
            addr = (spec.tracker_host, spec.tracker_port)
        state = run_server(addr, key, token or "", host, port, port_end, silent=True)
        typer.echo(f"edgec device: serving key {key!r} on {host}:{state.port}"
                   + (f" via tracker {tracker}" if tracker else ""), err=False)
        import sys

        sys.stdout.flush()
        state.thread.join()

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
        tracker: Annotated[str | None, typer.Option("--tracker", help="HOST:PORT: measure on devices there.")] = None,
        key: Annotated[str | None, typer.Option("--key", help="Device key at the tracker.")] = None,
        token: TokenOpt = None,
        data_dir: DataDirOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Choose the most accurate model whose latency is within the budget with 95 % confidence."""
        from toolchain.pick import PickConfig, render_markdown, run_pick
        from toolchain.remote import RemoteSpec

        remote = RemoteSpec.parse(tracker, key or profile, token or os.environ.get("EDGEC_DEVICE_TOKEN")) \
            if tracker else None
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
        from toolchain.ci import render_summary, run_ci

        outcome = run_ci(project, get_cache(), update_baseline=update_baseline, token=token,
                         progress=not as_json)
        emit(outcome.report, as_json, lambda: render_summary(outcome.report))
        if outcome.exit_code:
            raise typer.Exit(outcome.exit_code)
