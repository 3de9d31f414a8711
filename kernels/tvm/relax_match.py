"""Helpers shared by the Relax pattern matchers of the fused kernels (kan.py, lif.py)."""

from __future__ import annotations

from typing import Any


class NoMatch(Exception):
    """The subgraph is not one the kernel can fuse; the message says why."""


def static_shape(e: Any) -> tuple[int, ...]:
    """The static shape of a Relax expression; NoMatch when any dimension is symbolic."""
    try:
        return tuple(int(d) for d in e.ty.shape.values)
    except (AttributeError, TypeError):
        raise NoMatch("dynamic shape") from None


def const_ints(e: Any) -> list[int]:
    """Integers of a Relax shape / tuple / list of IntImm."""
    vals = getattr(e, "values", None)
    if vals is None:
        vals = list(e.fields) if hasattr(e, "fields") else list(e)
    return [int(getattr(v, "value", v)) for v in vals]
