"""One kernel for a whole chain of small dense layers (a tiny MLP), instead of one kernel per layer.

A ~5 us MLP spends a quarter of its time outside its kernels: per layer the Relax VM runs four
instructions (allocate storage, allocate the tensor, free, call the kernel), each a packed-function
call. The ``fuse-gemv-chains`` pass (``kernels.tvm.passes.fuse_chain``) rewrites a run of packed-GEMV
``call_tir``s in which every intermediate is used once, by the next layer only, into one ``call_tir`` of
``chain_kernel``: the layers' loop nests (``kernels.tvm.tir.gemv.emit_layer``, which the per-layer kernel
uses too, so the code per layer is identical) one after another in a single PrimFunc, built with the
IRBuilder in a plain loop over the layers, the intermediates in two ping-pong scratch buffers on the
stack, all packed weights in one constant and all biases in another.

Only chains whose packed weights total at most the profile's ``gemv_chain_max_kb`` are fused: past a
few hundred KB a model is bound by weight streaming and the saved dispatch is noise (0 turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL
from kernels.tvm.tir.gemv import GemvParams, emit_layer

KERNEL_NAME = "gemv-chain-f32"


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a chain: its parameters and its packed weight / bias constants."""

    params: GemvParams
    weight: np.ndarray  # packed (kernels.tvm.tir.gemv.pack_weight)
    bias: np.ndarray | None


def chain_kernel(layers: list[GemvParams], x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> Any:
    """The PrimFunc ``(x, w_all, b_all, y)`` running ``layers`` in order; w_all / b_all are the layers'
    packed weights / biases concatenated (layers without bias take no bias space)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    if not layers:
        raise ValueError("a chain needs at least one layer")
    m = layers[0].m
    woffs = np.cumsum([0] + [p.packed_size for p in layers]).tolist()
    boffs = np.cumsum([0] + [p.n if p.bias else 0 for p in layers]).tolist()
    widest = max([p.n for p in layers[:-1]] + [1])  # widest intermediate
    with IRBuilder() as ib, T.prim_func():
        T.func_name("chain")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME, "tirx.is_scheduled": True})
        xg = T.arg("xg", T.buffer(x_shape, "float32"))
        wp = T.arg("wp", T.buffer((max(1, woffs[-1]),), "float32"))
        b = T.arg("b", T.buffer((max(1, boffs[-1]),), "float32"))
        yg = T.arg("yg", T.buffer(y_shape, "float32"))
        x = T.decl_buffer((m, layers[0].k), "float32", data=xg.data)
        y = T.decl_buffer((m, layers[-1].n), "float32", data=yg.data)
        # Intermediates ping-pong between two scratch buffers: layer j reads what layer j - 1 wrote.
        scratch = (T.alloc_buffer((m, widest), "float32", scope="local"),
                   T.alloc_buffer((m, widest), "float32", scope="local"))
        for j, p in enumerate(layers):
            src = x if j == 0 else scratch[(j - 1) % 2]
            dst = y if j == len(layers) - 1 else scratch[j % 2]
            emit_layer(p, src, wp, woffs[j], b, boffs[j], dst)
    return ib.get()


__all__ = ["KERNEL_NAME", "ChainLayer", "chain_kernel"]
