"""Max pooling over channel-blocked activations, written as low-level TIR (IRBuilder).

The direct convolutions can keep their outputs channel-blocked, ``(N, C / B, H, W, B)`` (``conv2d.ConvParams``
``blocked_out``): a max pool between two of them (a ResNet stem's 3x3 stride-2 pool) then reads that layout and
takes the max of whole channel vectors, one vector load and one ``max`` per window position and B channels,
instead of the generic NCHW pool over single values (ResNet-18's stem pool: 331 us in the generic lowering). The
output is blocked too, or NCHW where a consumer needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kernels.tvm import ATTR_KERNEL

KERNEL_NAME = "maxpool-blocked-f32"


@dataclass(frozen=True)
class PoolParams:
    """One 2-D max pool (floor mode, dilation 1) over a channel-blocked input of ``block`` channels per block."""

    n: int
    c: int
    ih: int
    iw: int
    kh: int
    kw: int
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]  # top, left, bottom, right
    block: int
    blocked_out: bool = False

    @property
    def oh(self) -> int:
        return (self.ih + self.pad[0] + self.pad[2] - self.kh) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        return (self.iw + self.pad[1] + self.pad[3] - self.kw) // self.stride[1] + 1

    @property
    def blocks(self) -> int:
        return -(-self.c // self.block)

    @property
    def in_shape(self) -> tuple[int, int, int, int, int]:
        return (self.n, self.blocks, self.ih, self.iw, self.block)

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.blocked_out:
            return (self.n, self.blocks, self.oh, self.ow, self.block)
        return (self.n, self.c, self.oh, self.ow)


def max_pool_blocked_kernel(p: PoolParams) -> Any:
    """The PrimFunc ``(x[p.in_shape], y[p.out_shape])``, marked hand-written: per output position the max of the
    window's in-bounds channel vectors (a window always holds at least one: padding is smaller than the window).
    Channels past C are zeros in a blocked input and stay zeros."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    assert p.pad[0] < p.kh and p.pad[1] < p.kw, "every window must hold an input position"
    B = p.block
    SH, SW = p.stride
    top, left = p.pad[0], p.pad[1]
    with IRBuilder() as ib, T.prim_func():
        T.func_name("max_pool_blocked")
        T.func_attr({"tirx.noalias": True, ATTR_KERNEL: KERNEL_NAME, "tirx.is_scheduled": True})
        x = T.arg("x", T.buffer(p.in_shape, "float32"))
        y = T.arg("y", T.buffer(p.out_shape, "float32"))
        acc = T.alloc_buffer((B,), "float32", scope="global")  # under 1 KB: on the stack, in registers
        with T.serial(p.n) as n, T.serial(p.blocks) as cb, T.serial(p.oh) as oh, T.serial(p.ow) as ow:
            with T.vectorized(B) as i:
                T.buffer_store(acc, T.float32(-3.4028234663852886e38), [i])
            for kh in range(p.kh):
                for kw in range(p.kw):
                    h, w = oh * SH - top + kh, ow * SW - left + kw
                    inside = T.And(T.And(h >= 0, h < p.ih), T.And(w >= 0, w < p.iw))
                    with T.If(inside), T.Then(), T.vectorized(B) as i:
                        T.buffer_store(acc, T.max(acc[i], x[n, cb, h, w, i]), [i])
            if p.blocked_out:
                with T.vectorized(B) as i:
                    T.buffer_store(y, acc[i], [n, cb, oh, ow, i])
            else:
                with T.serial(min(B, p.c)) as i, T.If(cb * B + i < p.c), T.Then():
                    T.buffer_store(y, acc[i], [n, cb * B + i, oh, ow])
    return ib.get()


__all__ = ["KERNEL_NAME", "PoolParams", "max_pool_blocked_kernel"]
