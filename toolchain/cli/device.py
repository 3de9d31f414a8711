"""``edgec device serve``: run this machine as a benchmark device behind a TVM RPC tracker."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from toolchain.cli.common import TokenOpt, handled
from toolchain.device.protocol import RemoteSpec, token_from_env
from toolchain.device.server import serve as run_server


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

        token = token_from_env(token)
        addr = None
        if tracker:
            spec = RemoteSpec.parse(tracker, key, token or "-")
            addr = (spec.tracker_host, spec.tracker_port)
        state = run_server(addr, key, token or "", host, port, port_end, silent=True)
        typer.echo(f"edgec device: serving key {key!r} on {host}:{state.port}"
                   + (f" via tracker {tracker}" if tracker else ""), err=False)
        sys.stdout.flush()
        state.thread.join()
