"""Shared CLI plumbing: error handling, JSON/human output, common options. Used by cli.py and every verb
group in toolchain/cli/."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from toolchain.core.cache import Cache
from toolchain.core.errors import EdgecError

STATE: dict[str, Any] = {"verbose": False, "cache_dir": None}
F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="Device profile id (edgec profiles list) or .toml path.")]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Directory with the dataset files (Fashion-MNIST IDX, Planetoid raw).")
]


TokenOpt = Annotated[str | None, typer.Option("--token", help="Device token (default $EDGEC_DEVICE_TOKEN).")]
TrackerOpt = Annotated[str | None, typer.Option("--tracker", help="HOST:PORT of a TVM RPC tracker: run on a device.")]
KeyOpt = Annotated[str | None, typer.Option("--key", help="Device key at the tracker (with --tracker).")]


def get_cache() -> Cache:
    """The cache of this invocation: --cache-dir, else $EDGEC_CACHE, else ~/.cache/edgec."""
    return Cache(STATE["cache_dir"])


def handled(fn: F) -> F:
    """One line on stderr and a meaningful exit code for every error; tracebacks only with --verbose."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgecError as e:
            if STATE["verbose"]:
                raise
            typer.echo(f"edgec: error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("edgec: interrupted; completed stages stay cached", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # a bug: say so in one line
            if STATE["verbose"]:
                raise
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            typer.echo(f"edgec: internal error: {type(e).__name__}: {msg} (rerun with --verbose and report it)",
                       err=True)
            raise typer.Exit(4) from None

    return wrapper  # type: ignore[return-value]


def emit(data: Any, as_json: bool, human: Callable[[], str]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(human())


