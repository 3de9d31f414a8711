"""One kernel for a whole chain of small dense layers (a tiny MLP), instead of one kernel per layer.

A ~5 us MLP spends a quarter of its time outside its kernels: per layer the Relax VM runs four
instructions (allocate storage, allocate the tensor, free, call the kernel), each a packed-function
call. The ``fuse-gemv-chains`` pass (``kernels.tvm.passes.fuse_chain``) rewrites a run of dense-layer
``call_tir``s in which every intermediate is used once, by the next layer only, into one ``call_tir`` of
``chain_kernel``: the layers' loop nests one after another in a single PrimFunc, built with the IRBuilder in
a plain loop over the layers, each intermediate in a scratch buffer (on the stack below 1 KB:
``gemv.SCRATCH_SCOPE``), all constants in one pool per dtype. The loop nest of a layer is the one its
per-layer kernel emits (same function), so the code per layer is identical:

- ``f32``: the packed fp32 GEMV (``kernels.tvm.tir.gemv.emit_layer``);
- ``bf16``: the bf16-weight GEMV (``kernels.tvm.tir.gemv_bf16.emit_layer_bf16``);
- ``i8``: a whole int8 layer on the CPU's dot products, float in and float out
  (``kernels.tvm.tir.int8_dot.emit_dot_layer``): the activation quantized (dynamic or static) into a stack
  copy in the layer's prologue, the dot products, the dequantization, bias, relu and requantize steps in its
  epilogue. A chain of int8 layers thus never writes an intermediate to memory outside the kernel's stack.

Steps need not form a line: a step reads any earlier intermediate and writes a column range of any
intermediate or of the output, so parallel branches that read one input and end in a concatenation along
the last axis (a supernet's experts) are one kernel too, with a constant column gather after it (the
supernet's class order) copied out at the end.

Only chains whose constants total at most the profile's ``gemv_chain_max_kb`` are fused: past a few hundred
KB a model is bound by weight streaming and the saved dispatch is noise (0 turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir.gemv import SCRATCH_SCOPE, GemvParams, emit_layer
from kernels.tvm.tir.gemv_bf16 import emit_layer_bf16
from kernels.tvm.tir.int8_dot import ActivationPrologue, DotParams, emit_dot_layer

KERNEL_NAME = "gemv-chain-f32"
KERNEL_NAME_BF16 = "gemv-chain-bf16w"
KERNEL_NAME_INT8 = "gemv-chain-i8"
# The constant pools the kernel takes, in argument order (only those a chain uses).
POOL_DTYPES = ("float32", "uint32", "int8", "int32")
# The dtypes of each kind's constants, in the order its emitter takes them.
CONST_DTYPES = {"f32": ("float32", "float32"),  # packed weight, bias
                "bf16": ("uint32", "float32"),  # bf16 pairs, bias
                "i8": ("int8", "int32", "float32", "float32")}  # packed weight, column sums, scales, bias
POOL_ALIGN = 64  # bytes: each constant starts on a cache line
MAX_GATHER_COLUMNS = 256  # a column gather after the chain is unrolled: one store per column


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a chain: its kind (``CONST_DTYPES``), parameters and constants."""

    kind: str
    params: GemvParams | DotParams
    consts: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.consts)


@dataclass(frozen=True)
class ChainStep:
    """``layer`` reading buffer ``src`` and writing columns [col0, col0 + n) of buffer ``dst``; buffers: -1 the
    kernel's x (as src) or y (as dst), i >= 0 intermediate i."""

    layer: ChainLayer
    src: int
    dst: int
    col0: int = 0


def kernel_name(steps: list[ChainStep]) -> str:
    kinds = {s.layer.kind for s in steps}
    return KERNEL_NAME_INT8 if "i8" in kinds else KERNEL_NAME_BF16 if "bf16" in kinds else KERNEL_NAME


def pool_constants(steps: list[ChainStep]) -> tuple[dict[str, np.ndarray], list[tuple[int, ...]]]:
    """(dtype -> pool, per step the element offset of each of its constants in its dtype's pool)."""
    parts: dict[str, list[np.ndarray]] = {d: [] for d in POOL_DTYPES}
    used = dict.fromkeys(POOL_DTYPES, 0)
    offsets: list[tuple[int, ...]] = []
    for s in steps:
        offs = []
        for arr, dtype in zip(s.layer.consts, CONST_DTYPES[s.layer.kind], strict=True):
            align = POOL_ALIGN // np.dtype(dtype).itemsize
            pad = -used[dtype] % align
            parts[dtype] += [np.zeros(pad, dtype), np.ascontiguousarray(arr, dtype).reshape(-1)]
            offs.append(used[dtype] + pad)
            used[dtype] += pad + arr.size
        offsets.append(tuple(offs))
    pools = {d: np.concatenate(parts[d]) for d in POOL_DTYPES if used[d]}
    return pools, offsets


def chain_kernel(steps: list[ChainStep], widths: list[int], x_shape: tuple[int, ...], y_shape: tuple[int, ...],
                 columns: tuple[int, ...] = ()) -> tuple[Any, list[np.ndarray]]:
    """(the PrimFunc ``(x, pools..., y)`` running ``steps`` in order, its pool constants in argument order);
    ``widths[i]``: the columns of intermediate i. Every step has the same row count. ``columns``: the steps'
    result (``r``, what they write as y) is not y itself but ``y[:, j] = r[:, columns[j]]`` (a column gather
    after a concatenation, e.g. a supernet's class order), copied from a scratch buffer at the end."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    if not steps:
        raise ValueError("a chain needs at least one layer")
    m = steps[0].layer.params.m
    pools, offsets = pool_constants(steps)
    with IRBuilder() as ib, T.prim_func():
        T.func_name("chain")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: kernel_name(steps), "tirx.is_scheduled": True})
        xg = T.arg("xg", T.buffer(x_shape, "float32"))
        pool = {d: T.arg(f"c_{d}", T.buffer(pools[d].shape, d)) for d in pools}
        yg = T.arg("yg", T.buffer(y_shape, "float32"))
        x = T.decl_buffer((m, steps[0].layer.params.k), "float32", data=xg.data)
        out_width = int(np.prod(y_shape)) // m
        out = T.decl_buffer((m, out_width), "float32", data=yg.data)
        y_width = max(s.col0 + s.layer.params.n for s in steps if s.dst < 0) if columns else out_width
        y = T.alloc_buffer((m, y_width), "float32", scope=SCRATCH_SCOPE) if columns else out
        scratch = [T.alloc_buffer((m, w), "float32", scope=SCRATCH_SCOPE) for w in widths]
        quantized: dict[tuple[Any, ...], ActivationPrologue] = {}  # (src, quantization) -> its prologue
        for s, offs in zip(steps, offsets, strict=True):
            p, n = s.layer.params, s.layer.params.n
            src = x if s.src < 0 else scratch[s.src]
            whole, width = (y, y_width) if s.dst < 0 else (scratch[s.dst], widths[s.dst])
            dst = whole if s.col0 == 0 and n == width else \
                T.decl_buffer((m, n), "float32", data=whole.data, elem_offset=s.col0, strides=[width, 1])
            if s.layer.kind == "f32":
                assert isinstance(p, GemvParams)
                emit_layer(p, src, pool["float32"], offs[0], pool["float32"], offs[1], dst)
            elif s.layer.kind == "bf16":
                assert isinstance(p, GemvParams)
                emit_layer_bf16(p, src, pool["uint32"], offs[0], pool["float32"], offs[1], dst)
            else:
                assert isinstance(p, DotParams)
                views = [T.decl_buffer((max(1, c.size),), d, data=pool[d].data, elem_offset=o)
                         for c, d, o in zip(s.layer.consts, CONST_DTYPES["i8"], offs, strict=True)]
                # Branches reading one input quantized alike share its quantized copy.
                key = (s.src, p.isa, p.dynamic, p.x_scale, p.x_zero)
                quantized[key] = emit_dot_layer(p, src, views[0], views[1], dst, None, views[2], views[3],
                                                quantized.get(key))
        if columns:
            with T.serial(m) as r:
                for j, c in enumerate(columns):
                    T.buffer_store(out, y[r, c], [r, j])
    return ib.get(), [pools[d] for d in POOL_DTYPES if d in pools]


__all__ = [
    "CONST_DTYPES",
    "KERNEL_NAME",
    "KERNEL_NAME_BF16",
    "KERNEL_NAME_INT8",
    "MAX_GATHER_COLUMNS",
    "ChainLayer",
    "ChainStep",
    "chain_kernel",
    "kernel_name",
    "pool_constants",
]
