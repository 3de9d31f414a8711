"""CLI command modules beyond the core verbs. Each module defines ``register(app)`` and adds its
commands (or a sub-typer) to the ``edgec`` app. One explicit tuple, in help order."""

from __future__ import annotations

import importlib

import typer

MODULES = (
    "toolchain.commands.device",  # edgec device serve / edgec pick / edgec ci (issue 6)
    "toolchain.commands.tune",  # edgec tune (issue 5)
)


def register_all(app: typer.Typer) -> None:
    for name in MODULES:
        importlib.import_module(name).register(app)
