"""Running the installed ``edgec`` the way a user does: a real subprocess, its own cache, and the checks every
adversarial case makes (exit code, one line on stderr, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EDGEC = Path(sys.executable).parent / "edgec"


UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]  # nobody:nogroup


def edgec(args: list[str], cache: Path, *, timeout: float = 300, env: dict[str, str] | None = None,
          cwd: Path | None = None, umask: int | None = None,
          unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    """``edgec ARGS`` with EDGEC_CACHE=cache and this checkout first on the import path; with ``umask`` set for
    the child, or run as nobody (``unprivileged``: permission checks apply even when the tests run as root)."""
    full_env = {**os.environ, "EDGEC_CACHE": str(cache), "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [*(UNPRIVILEGED if unprivileged else []), str(EDGEC), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=timeout,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    """The run ended with ``code`` and exactly one non-empty stderr line, no traceback; returns that line."""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, f"stderr is not one line:\n{r.stderr}"
    return lines[0]
