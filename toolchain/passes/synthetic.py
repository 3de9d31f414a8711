"""Small ONNX models built in code, for the passes' tests and benchmarks (no training involved).

``g2g_masked_mlp`` builds a G2GNet-shaped layer stack: each hidden layer's weight is column-structured
like G2GNet's default ``inter_granularity="column"`` masks (output group g reads its own input group plus
a fixed-size random subset of foreign inputs), stored as a dense matrix full of zeros; the final layer is
dense. It stands in for a trained G2GNet zoo entry where none exists and is always labelled synthetic.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def g2g_mask(n_in: int, n_out: int, groups: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """[in, out] boolean mask: group g's outputs read input group g + (K - in/G) shared foreign inputs."""
    gi, go = n_in // groups, n_out // groups
    k = int(round(n_in * density))
    mask = np.zeros((n_in, n_out), dtype=bool)
    for g in range(groups):
        own = np.arange(g * gi, (g + 1) * gi if g < groups - 1 else n_in)
        foreign = rng.choice(np.setdiff1d(np.arange(n_in), own), max(0, k - len(own)), replace=False)
        mask[np.concatenate([own, foreign]), g * go:(g + 1) * go] = True
    return mask


def mlp_model(weights: list[np.ndarray], biases: list[np.ndarray | None], gemm: bool = True,
              act: str = "Relu", dynamic_batch: bool = True) -> onnx.ModelProto:
    """x -> [Gemm(transB=1) | MatMul + Add] -> act -> ... -> logits; weights given as [in, out]."""
    nodes, inits = [], []
    cur = "x"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        y = f"h{i}"
        if gemm:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T.astype(np.float32)), f"w{i}"))
            ins = [cur, f"w{i}"]
            if b is not None:
                inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
                ins.append(f"b{i}")
            nodes.append(helper.make_node("Gemm", ins, [y], transB=1, name=f"fc{i}"))
        else:
            inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [y if b is None else f"{y}_mm"], name=f"fc{i}"))
            if b is not None:
                inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
                nodes.append(helper.make_node("Add", [f"{y}_mm", f"b{i}"], [y], name=f"fc{i}_bias"))
        cur = y
        if i < len(weights) - 1:
            nodes.append(helper.make_node(act, [cur], [f"a{i}"], name=f"act{i}"))
            cur = f"a{i}"
    batch: str | int = "batch" if dynamic_batch else 1
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, weights[0].shape[0]])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [batch, weights[-1].shape[1]])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def random_mlp(dims: list[int], seed: int = 0, gemm: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32) for a, b in zip(dims[:-1], dims[1:], strict=True)]
    bs = [(rng.standard_normal(b) * 0.1).astype(np.float32) for b in dims[1:]]
    return mlp_model(ws, bs, gemm=gemm)


def g2g_masked_mlp(dims: tuple[int, ...] = (784, 1024, 1024, 10), groups: int = 8, density: float = 0.25,
                   seed: int = 0, gemm: bool = True) -> onnx.ModelProto:
    """G2GNet-shaped stack: every layer but the last masked column-structured; stored dense with zeros."""
    rng = np.random.default_rng(seed)
    ws, bs = [], []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a * density)).astype(np.float32)
        if i < len(dims) - 2:
            w = w * g2g_mask(a, b, groups, density, rng)
        ws.append(w)
        bs.append((rng.standard_normal(b) * 0.05).astype(np.float32))
    return mlp_model(ws, bs, gemm=gemm)
