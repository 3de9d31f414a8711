"""Running the installed ``edgec`` the way a user does: a real subprocess, its own cache, and the checks every
adversarial case makes (exit code, one line on stderr, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EDGEC = Path(sys.executable).parent / "edgec"


def edgec(args: list[str], cache: Path, *, timeout: float = 300, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``edgec ARGS`` with EDGEC_CACHE=cache and this checkout first on the import path."""
    full_env = {**os.environ, "EDGEC_CACHE": str(cache), "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([str(EDGEC), *args], capture_output=True, text=True, env=full_env, cwd=cwd or REPO,
                          timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    """The run ended with ``code`` and exactly one non-empty stderr line, no traceback; returns that line."""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, f"stderr is not one line:\n{r.stderr}"
    return lines[0]
