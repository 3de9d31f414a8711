"""Tiny real models for the bench / remote / pick / ci tests: a linear classifier fitted by least
squares on real Fashion-MNIST (about 80 % test accuracy, fitted in well under a second)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def fit_linear(ds: object, n: int = 6000, hidden: int = 0, seed: int = 0) -> onnx.ModelProto:
    """Ridge regression onto one-hot labels. ``hidden`` > 0 prepends a random-feature ReLU layer of that
    width (a bigger, slower model; still fitted on real data)."""
    x = ds.x_train[:n].reshape(n, -1).astype(np.float64)  # type: ignore[attr-defined]
    y = np.eye(10)[ds.y_train[:n]]  # type: ignore[attr-defined]
    rng = np.random.default_rng(seed)
    inits, nodes, cur = [], [], "x"
    feats = x
    if hidden:
        w0 = (rng.standard_normal((784, hidden)) / 28.0).astype(np.float32)
        feats = np.maximum(x @ w0, 0)
        inits.append(numpy_helper.from_array(w0, "w0"))
        nodes += [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["hr"])]
        cur = "hr"
    d = feats.shape[1]
    w = np.linalg.solve(feats.T @ feats + 1e-1 * np.eye(d), feats.T @ y).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "w"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "b"))
    nodes += [helper.make_node("MatMul", [cur, "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 784])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgec-tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return path


def random_mlp(dims: tuple[int, ...], seed: int = 0) -> onnx.ModelProto:
    """An untrained MLP of the given widths (for memory and size checks, not accuracy)."""
    rng = np.random.default_rng(seed)
    inits, nodes, cur = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]))
        cur = f"m{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dims[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dims[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgec-tests")
