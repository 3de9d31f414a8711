"""The zoo registry: one explicit dict of every entry, assembled from the family modules."""

from __future__ import annotations

import importlib

from toolchain.core.errors import UsageError
from toolchain.zoo import ZooEntry

# Family modules, each exporting ENTRIES: tuple[ZooEntry, ...]. Imported lazily (they import torch).
FAMILY_MODULES = ("toolchain.zoo.mlp", "toolchain.zoo.g2gnet", "toolchain.zoo.kan", "toolchain.zoo.skan",
                  "toolchain.zoo.gnn_mlp", "toolchain.zoo.spiking", "toolchain.zoo.nnfactory")


def entries() -> dict[str, ZooEntry]:
    out: dict[str, ZooEntry] = {}
    for modname in FAMILY_MODULES:
        for e in importlib.import_module(modname).ENTRIES:
            out[e.name] = e
    return out


def get_entry(name: str) -> ZooEntry:
    all_entries = entries()
    if name not in all_entries:
        raise UsageError(f"unknown zoo model {name!r}; see 'edgec zoo list' ({', '.join(sorted(all_entries))})")
    return all_entries[name]
