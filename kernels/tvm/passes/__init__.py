"""The Relax -> Relax rewrites that put edgec's kernels into a model, one TVM module pass each.

Each is a ``RewritePass`` subclass; ``X.create(cfg)`` gives the ``tvm.transform.ModulePass``, whose
``report`` lists what its last run put in (one dict per kernel). In pipeline order:

- ``FuseKan`` (fuse_kan.py), ``FuseLif`` (fuse_lif.py), ``DensifyGrouped`` (densify_grouped.py),
  ``SubstituteGemv`` (substitute_gemv.py), ``SubstituteConv`` (substitute_conv.py): the profile's
  hand-written kernels, on the imported graph (``substitution_passes`` picks those the config turns on);
- ``FuseGemvChains`` (fuse_chain.py): runs of packed-GEMV calls as one kernel;
- ``FastMath`` (fast_math.py): exp / sigmoid as vectorizable arithmetic, after decomposition.
"""

from __future__ import annotations

from typing import Any

from kernels.tvm import KernelConfig
from kernels.tvm.passes._rewrite import NoMatch, RewritePass
from kernels.tvm.passes.densify_grouped import DensifyGrouped
from kernels.tvm.passes.fast_math import FastMath
from kernels.tvm.passes.fuse_chain import FuseGemvChains
from kernels.tvm.passes.fuse_kan import FuseKan
from kernels.tvm.passes.fuse_lif import FuseLif
from kernels.tvm.passes.substitute_conv import SubstituteConv
from kernels.tvm.passes.substitute_gemv import SubstituteGemv


def substitution_passes(cfg: KernelConfig, conv_generic: frozenset[str] = frozenset()) -> list[Any]:
    """The kernel substitution passes ``cfg`` turns on, in order: fused KAN, fused LIF, then (with the
    GEMV on) the grouped form densified (with the grouped GEMV on) and the dense layers substituted, then the
    convolutions (but the layers keyed in ``conv_generic``: a tuned schedule measured faster there)."""
    kinds: list[type[RewritePass]] = []
    if cfg.kan:
        kinds.append(FuseKan)
    if cfg.lif:
        kinds.append(FuseLif)
    if cfg.gemv:  # the grouped kernel is a GEMV variant: GEMV off turns both off
        if cfg.grouped:
            kinds.append(DensifyGrouped)
        kinds.append(SubstituteGemv)
    if cfg.conv:
        kinds.append(SubstituteConv)
    return [kind.create(cfg, conv_generic) if kind is SubstituteConv else kind.create(cfg) for kind in kinds]


__all__ = ["DensifyGrouped", "FastMath", "FuseGemvChains", "FuseKan", "FuseLif", "NoMatch", "RewritePass",
           "SubstituteConv", "SubstituteGemv", "substitution_passes"]
