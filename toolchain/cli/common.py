"""Shared CLI plumbing: error handling, JSON/human output, common options. Used by cli.py and every verb
group in toolchain/cli/."""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from toolchain.core.cache import Cache, default_cache_root
from toolchain.core.errors import EdgecError, InfraError, UsageError

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


# Libraries whose log records and warnings are noise to an edgec user (multi-line tracebacks from torch.export,
# onnxscript's rewriter chatter): shown only with --verbose.
THIRD_PARTY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx", "onnxruntime", "tvm", "matplotlib", "urllib3")


def quiet_third_party_logs() -> None:
    """Without --verbose: no Python warnings and no records from THIRD_PARTY_LOGGERS. torch resets its top logger
    to WARNING when it is imported (later, lazily), so that logger's level is pinned here before torch exists."""
    warnings.simplefilter("ignore")
    for name in THIRD_PARTY_LOGGERS:
        log = logging.getLogger(name)
        log.setLevel(logging.CRITICAL + 1)
        log.setLevel = lambda _level: None  # type: ignore[method-assign]  # torch's _init_logs must not undo it


_PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.ENAMETOOLONG)


def _os_error(e: OSError) -> EdgecError | None:
    """A file edgec read or wrote failed: a full disk or an unwritable cache is the environment (exit 3), a path
    the user gave (-o a directory or read-only) is the input (exit 2). None: not a file problem (left as a bug)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InfraError(f"disk full writing {e.filename or 'a file'}; free space and rerun")
    path = e.filename2 or e.filename  # os.replace(tmp, dst) fails naming dst second: the path the user gave
    if e.errno not in _PATH_ERRNOS or not path:
        return None
    root = Path(STATE["cache_dir"]) if STATE["cache_dir"] else default_cache_root()
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and Path(str(path)).absolute().is_relative_to(
            root.absolute()):
        return InfraError(f"cache not writable: {path} ({e.strerror}); fix its permissions or pass --cache-dir")
    return UsageError(f"cannot use {path}: {e.strerror}; check the path and its permissions")


def handled(fn: F) -> F:
    """One line on stderr and a meaningful exit code for every error; tracebacks only with --verbose."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not STATE["verbose"]:
            quiet_third_party_logs()
        try:
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                mapped = None if STATE["verbose"] else _os_error(e)
                if mapped is None:
                    raise
                raise mapped from None
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


def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float written as the string "inf", "-inf" or "nan" (JSON has no NaN or
    Infinity: json.dumps would print tokens other parsers reject)."""
    if isinstance(data, float) and not math.isfinite(data):
        return "nan" if math.isnan(data) else ("inf" if data > 0 else "-inf")
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def emit(data: Any, as_json: bool, human: Callable[[], str]) -> None:
    if as_json:
        typer.echo(json.dumps(finite_json(data), indent=2, default=str, allow_nan=False))
    else:
        typer.echo(human())


