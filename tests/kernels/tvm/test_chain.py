"""Chain kernel (a tiny MLP's dense layers as one PrimFunc) vs the per-layer kernels and numpy."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernels.tvm.testing import build_vm, dense_onnx, with_kernels
from toolchain.core.profile import load_profile


def _mlp(dims: list[int], gemm: bool, seed: int = 0, rows: int = 1) -> tuple:
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((a, c)).astype(np.float32) for a, c in itertools.pairwise(dims)]
    bs: list[np.ndarray | None] = [rng.standard_normal(c).astype(np.float32) for c in dims[1:]]
    if not gemm:
        bs[1] = None  # a layer without bias: matmul + relu only
    return dense_onnx(ws, bs, relu=True, gemm=gemm, rows=rows), ws, bs


def _numpy(x: np.ndarray, ws: list, bs: list) -> np.ndarray:
    for i, (w, b) in enumerate(zip(ws, bs)):
        x = x @ w + (b if b is not None else 0)
        if i < len(ws) - 1:
            x = np.maximum(x, 0)
    return x


@pytest.mark.parametrize(("profile_id", "gemm"), [("x86-avx512", False), ("x86-avx2", True)])
def test_chain_matches_per_layer_kernels(profile_id: str, gemm: bool) -> None:
    dims = [97, 70, 33, 45, 10]  # odd sizes: tails in K (unroll / partial sums) and N (narrow tail blocks)
    model, ws, bs = _mlp(dims, gemm)
    prof = load_profile(profile_id)
    fused, table = build_vm(model, prof)
    layers, ltable = build_vm(model, with_kernels(prof, gemv_chain_max_kb=0))
    assert [r["kernel"] for r in table] == ["gemv-chain-f32"]  # the per-layer PrimFuncs are gone too
    assert [r["kernel"] for r in ltable] == ["gemv-packed-f32"] * 4
    x = np.random.default_rng(1).standard_normal((1, dims[0])).astype(np.float32)
    np.testing.assert_array_equal(fused(x), layers(x))  # same loop nests, same summation order
    np.testing.assert_allclose(fused(x), _numpy(x, ws, bs), rtol=1e-4, atol=1e-4)


def test_chain_multi_row() -> None:
    """T*B rows (a spiking layer's stateless matmuls) chain too: intermediates are (M, N) scratch."""
    model, ws, bs = _mlp([40, 24, 18], gemm=True, rows=3)
    fused, table = build_vm(model, load_profile("x86-avx512"))
    assert [r["kernel"] for r in table] == ["gemv-chain-f32"]
    x = np.random.default_rng(2).standard_normal((3, 40)).astype(np.float32)
    np.testing.assert_allclose(fused(x), _numpy(x, ws, bs), rtol=1e-4, atol=1e-4)


def test_size_threshold_keeps_large_chains_per_layer() -> None:
    model, _, _ = _mlp([300, 200, 10], gemm=True)  # ~240 KB of packed weights
    _, small = build_vm(model, with_kernels(load_profile("x86-avx512"), gemv_chain_max_kb=64))
    _, big = build_vm(model, with_kernels(load_profile("x86-avx512"), gemv_chain_max_kb=512))
    assert [r["kernel"] for r in small] == ["gemv-packed-f32"] * 2
    assert [r["kernel"] for r in big] == ["gemv-chain-f32"]


def test_shared_intermediate_is_not_fused() -> None:
    """An intermediate read twice (here: also a graph output) must stay materialised."""
    rng = np.random.default_rng(3)
    w0, w1 = rng.standard_normal((16, 12)).astype(np.float32), rng.standard_normal((12, 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W0"], ["h"]),
                           helper.make_node("MatMul", ["h", "W1"], ["y"])],
                          "two-out", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
                           helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 12])],
                          [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(w1, "W1")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    _, table = build_vm(model, load_profile("x86-avx512"))
    assert [r["kernel"] for r in table] == ["gemv-packed-f32"] * 2


def test_chain_of_ten_layers_is_one_kernel() -> None:
    """The chain kernel is built by a loop over the layers: any length fuses, bit-identical to per-layer."""
    dims = [24, 20, 18, 16, 14, 12, 14, 16, 18, 20, 10]
    model, ws, bs = _mlp(dims, gemm=True, seed=4)
    prof = load_profile("x86-avx512")
    fused, table = build_vm(model, prof)
    layers, ltable = build_vm(model, with_kernels(prof, gemv_chain_max_kb=0))
    assert [r["kernel"] for r in table] == ["gemv-chain-f32"]
    assert [r["kernel"] for r in ltable] == ["gemv-packed-f32"] * 10
    x = np.random.default_rng(5).standard_normal((1, dims[0])).astype(np.float32)
    np.testing.assert_array_equal(fused(x), layers(x))
    np.testing.assert_allclose(fused(x), _numpy(x, ws, bs), rtol=1e-4, atol=1e-4)
