"""Hand-written TVM kernels for edgec's layer kinds, and the Relax rewrites that put them into a model.

- ``passes/``: Relax -> Relax rewrites, each a TVM module pass exposing a ``report`` (what it replaced);
- ``tir/``: the PrimFunc builders those passes call (packed GEMV, grouped GEMV, GEMV chain, fused KAN,
  fused LIF) and the per-element interpreter the fused kernels share;
- ``schedule/``: the vector rule, a schedule for the light kernels no hand-written kernel covers;
- ``testing.py``: helpers for kernel tests and benchmarks (tiny ONNX graphs, in-process builds).

This package imports numpy only at module level (tvm lazily, inside functions) and nothing from the rest
of edgec: ``KernelConfig`` is built from a plain mapping or from an object with the profile's
``[kernels]`` field names (``toolchain.core.profile.KernelSpec``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ATTR_KERNEL = "edgec.kernel"  # PrimFunc attribute: the hand-written kernel's name (kernel tables, inspect)
ATTR_RULE = "edgec.rule"  # PrimFunc attribute: scheduled by the vector rule

# Profile [kernels] field name -> KernelConfig field name.
SPEC_FIELDS = {
    "use_gemv": "gemv",
    "use_grouped_matmul": "grouped",
    "use_fused_kan": "kan",
    "use_fused_lif": "lif",
    "lif_layer_max_rows": "lif_layer_max_rows",
    "vector_lanes": "lanes",
    "gemv_block_n": "block_n",
    "unroll": "unroll",
    "gemv_chain_max_kb": "chain_max_kb",
    "fast_exp": "fast_exp",
    "vector_rule": "vector_rule",
    "use_direct_conv": "conv",
    "conv_block_oc": "conv_block_oc",
    "conv_tile_ow": "conv_tile_ow",
}


@dataclass(frozen=True)
class KernelConfig:
    """Which kernels and rewrites a build uses, and their tile / vector parameters (defaults: KernelSpec's)."""

    gemv: bool = True  # batch-1 dense layers as the packed GEMV (off: the grouped GEMV is off too)
    grouped: bool = True  # block-sparse dense layers as the grouped GEMV
    kan: bool = True  # KAN layers as one fused kernel
    lif: bool = True  # unrolled spiking recurrences as one fused kernel
    lif_layer_max_rows: int = 8  # up to this many T*B rows, matmul + recurrence in one kernel
    lanes: int = 4  # fp32 lanes per vector register
    block_n: int = 32  # GEMV output columns per packed block
    unroll: int = 4  # GEMV k unroll
    chain_max_kb: int = 2048  # GEMV runs up to this many KB of packed weights become one kernel; 0: off
    fast_exp: bool = True  # exp / sigmoid as vectorizable arithmetic
    vector_rule: bool = True  # the rule schedule for what nothing else covers
    int8_isa: str = "none"  # int8 dot products of the CPU (``int8_isa``): vnni | avx2 | sdot | none
    conv: bool = True  # fp32 conv2d (groups 1 or depthwise) as the direct convolution kernels
    conv_block_oc: int = 16  # output channels per conv register tile (whole vectors)
    conv_tile_ow: int = 6  # output columns per conv register tile, at most

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> KernelConfig:
        """From the profile's ``[kernels]`` keys (``use_gemv``, ``vector_lanes``, ...) or this class's field
        names; missing keys keep their defaults, unknown keys are an error."""
        own = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = SPEC_FIELDS.get(key, key)
            if name not in own:
                raise ValueError(f"unknown kernel setting {key!r}: expected one of {sorted(SPEC_FIELDS)}")
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_spec(cls, spec: Any) -> KernelConfig:
        """From a profile's ``KernelSpec`` (any object with its field names as attributes)."""
        return cls.from_mapping({key: getattr(spec, key) for key in SPEC_FIELDS if hasattr(spec, key)})

    @classmethod
    def from_profile(cls, profile: Any) -> KernelConfig:
        """From a profile: its ``[kernels]`` table, and the int8 dot products of its ``[cpu]``."""
        cpu = profile.cpu
        isa = int8_isa(cpu.arch, cpu.int8_dot, cpu.vector_bits)
        return cls.from_mapping({**{key: getattr(profile.kernels, key) for key in SPEC_FIELDS
                                    if hasattr(profile.kernels, key)}, "int8_isa": isa})


def int8_isa(arch: str, int8_dot: str, vector_bits: int) -> str:
    """The int8 dot-product family a CPU runs (kernels/tvm/tir/int8_dot.py): ``vnni`` (x86 with AVX-512
    VNNI), ``avx2`` (``vpmaddubsw``: any other x86 with 256-bit vectors), ``sdot`` (aarch64 with dotprod),
    ``none`` (no int8 dot kernel: the sign-extending int32 GEMV)."""
    if arch == "x86_64":
        if int8_dot == "vnni" and vector_bits >= 512:
            return "vnni"
        if vector_bits >= 256:
            return "avx2"
    if arch == "aarch64" and int8_dot == "sdot":
        return "sdot"
    return "none"


__all__ = ["ATTR_KERNEL", "ATTR_RULE", "SPEC_FIELDS", "KernelConfig", "int8_isa"]
