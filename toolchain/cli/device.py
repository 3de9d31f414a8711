"""``edgec device serve``: run this machine as a benchmark device behind a TVM RPC tracker."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from typing import Annotated

import typer

from toolchain.cli.common import ProfileOpt, TokenOpt, handled
from toolchain.core.errors import InfraError, UsageError
from toolchain.core.profile import load_profile
from toolchain.device import emulate as emulator
from toolchain.device.protocol import TOKEN_ENV, token_from_env
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

    @device_app.command("emulate")
    @handled
    def emulate(
        profile: ProfileOpt,
        tracker: Annotated[str | None, typer.Option("--tracker", help="HOST:PORT of a TVM RPC tracker; default: start one on loopback.")] = None,
        token: TokenOpt = None,
        port: Annotated[int, typer.Option("--port", help="First port for the emulated device.")] = 9090,
        port_end: Annotated[int, typer.Option("--port-end", help="Last port to try (exclusive).")] = 9199,
        provision_only: Annotated[bool, typer.Option("--provision-only", help="Provision the emulator (once, ~150 MB) and exit.")] = False,
    ) -> None:
        """Run an emulated aarch64 device for an ARM profile (qemu-user, Debian's arm64 Python, TVM's aarch64
        wheels), registered as <profile>-emulated. Outputs, agreement and accuracy are real; latency is the
        emulator's (every result says "emulated": true)."""
        prof = load_profile(profile)
        emulator.check_profile(prof)
        d = emulator.provision()
        if provision_only:
            typer.echo(str(d))
            return
        token = token_from_env(token)
        if not token:
            raise UsageError(f"the emulated device needs a shared token; pass --token or set {TOKEN_ENV}")
        procs: list[subprocess.Popen] = []
        try:
            if tracker is None:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    tport = int(s.getsockname()[1])
                procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                               "--port", str(tport), "--port-end", str(tport + 1), "--silent"]))
                tracker = f"127.0.0.1:{tport}"
            # qemu emulates the profile core's instruction set: a library using an extension the core lacks stops with
            # SIGILL here, as it would on the device.
            argv, env = emulator.runtime_command(tracker, emulator.key_for(prof), port, port_end, d,
                                                 cpu=emulator.qemu_cpu(prof))
            env[TOKEN_ENV] = token
            device = subprocess.Popen(argv, env=env)
            procs.append(device)
            typer.echo(f"edgec device: emulated {prof.id} (aarch64 under qemu) registers as key "
                       f"{emulator.key_for(prof)!r} at tracker {tracker}; its latencies are the emulator's, not a "
                       "device's", err=True)
            code = device.wait()
            if code != 0:
                raise InfraError(f"the emulated device exited with code {code}; see its log above")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait()
