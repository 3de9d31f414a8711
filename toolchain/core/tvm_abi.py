"""The entry points of a TVM library edgec builds, shared by the build (``targets.tvm.weights_as_inputs``) and the
runner that loads it (``toolchain.device.runners.TvmLibRunner``).

Every library has ``main(inputs...)`` with its weights built in. A library whose weights nearly fill the CPU's L2
(the profile's ``kernels.contiguous_weights_min_kb`` to ``_max_kb``) also has ``main`` with the weights as trailing
arguments and a function that returns them, so that the runner can keep them in memory it lays out itself (one
buffer on a huge-page boundary)."""

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
