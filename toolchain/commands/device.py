"""Commands added by a later issue; see toolchain/commands/__init__.py."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    return None
