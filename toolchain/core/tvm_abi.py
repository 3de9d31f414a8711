"""The entry points of a TVM library edgec builds, shared by the build (``kernels.tvm.passes.weights_as_inputs``)
and the runner that loads it (``toolchain.device.runners.TvmLibRunner``).

Every library has ``main(inputs...)`` with its weights built in. A library whose weights are small enough to stay
in the CPU's L2 between calls also has ``main`` with the weights as trailing arguments and a function that returns
them, so that the runner can keep them in memory it lays out itself (one buffer on huge-page boundaries)."""

from __future__ import annotations

from typing import Any

MAIN = "main"
MAIN_WITH_WEIGHTS = "edgec_main_weights"  # main(inputs..., weights...): the same graph, its weights as arguments
WEIGHTS = "edgec_weights"  # () -> the tuple of those weight tensors, in argument order


def tensor_nbytes(tensor: Any) -> int:
    """The bytes of a TVM tensor's data (any dtype, sub-byte and vector lanes included)."""
    count = 1
    for d in tensor.shape:
        count *= int(d)
    return count * ((tensor.dtype.bits * tensor.dtype.lanes + 7) // 8)
