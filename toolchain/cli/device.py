"""``edgec device serve``: run this machine as a benchmark device behind a TVM RPC tracker."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from toolchain.cli.common import TokenOpt, handled
from toolchain.device.protocol import token_from_env
from toolchain.device.runtime import parse_tracker
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
        session_timeout: Annotated[float, typer.Option("--session-timeout",
                                                       help="End any session after this many seconds (0: never).")] = 0.0,
        custom_addr: Annotated[str | None, typer.Option("--custom-addr", help="Address the tracker gives clients (e.g. 127.0.0.1 behind an SSH tunnel).")] = None,
    ) -> None:
        """Serve benchmarks for edgec clients (TVM libraries, ONNX Runtime models, TensorRT engines). Every
        connection must pass edgec's token handshake before TVM reads a byte; a failed or crashed session is
        logged and the device keeps serving."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s edgec device: %(message)s", stream=sys.stderr)
        server = run_server(parse_tracker(tracker), key, token_from_env(token) or "", host, port, port_end,
                            session_timeout, custom_addr)
        typer.echo(f"edgec device: serving key {key!r} on {host}:{server.port}"
                   + (f" via tracker {tracker}" if tracker else "") + f" (runs {', '.join(sorted(server.runners))})")
        sys.stdout.flush()
        try:
            server.serve_forever()
        finally:
            server.close()
