"""The ``edgec`` command: the typer app, its global options, and one verb group per module of
``toolchain/cli/``. Each command parses options, calls one function of ``toolchain.api`` (or the layer
under it) and prints.

Exit codes: 0 ok, 1 a gate failed, 2 usage / input error, 3 SDK, device or data unavailable,
4 internal error (a bug: rerun with --verbose and report it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from toolchain.cli import artifacts, cache, catalog, decide, device, tune
from toolchain.cli.common import STATE

app = typer.Typer(
    help="edgec: deploy unconventional networks (sparse modular MLPs, KANs, GNN-distilled MLPs, spiking nets) "
    "to edge devices: export to ONNX with proven parity, compress, compile through TVM / TensorRT / "
    "ONNX Runtime for a device profile, and measure.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Artifact cache (default $EDGEC_CACHE or ~/.cache/edgec).")
    ] = None,
) -> None:
    STATE["verbose"] = verbose
    STATE["cache_dir"] = cache_dir


for group in (artifacts, tune, catalog, device, decide, cache):  # help order
    group.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
