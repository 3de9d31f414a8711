"""Helpers shared by the zoo family tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from toolchain.export import run_ort
from toolchain.measure.compare import compare


def full_test_parity(module: torch.nn.Module, model: onnx.ModelProto, x: np.ndarray) -> Any:
    """ONNX Runtime vs torch over the whole real test set, in chunks of 1000 (bounded memory)."""
    chunks = [x[i:i + 1000] for i in range(0, len(x), 1000)]
    with torch.no_grad():
        ref = np.concatenate([module(torch.from_numpy(c)).numpy() for c in chunks])
    got = np.concatenate([o[0] for o in run_ort(model, [{model.graph.input[0].name: c} for c in chunks])])
    return compare([ref], [got])
