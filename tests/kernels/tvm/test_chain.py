"""Chain kernel (a tiny MLP's dense layers as one PrimFunc) vs the per-layer kernels and numpy; int8 chains
and parallel branches into a concatenation (a supernet) as one kernel, vs ONNX Runtime on real inputs."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernels.tvm.testing import build_vm, dense_onnx, with_kernels
from toolchain.core.cache import Cache
from toolchain.core.onnx_io import ort_session
from toolchain.core.profile import load_profile
from toolchain.passes import PassContext
from toolchain.passes.int8 import Config as Int8Config
from toolchain.passes.int8 import run

ORT_AGREEMENT = 0.99  # share of Fashion-MNIST test images with the same argmax as ONNX Runtime on the int8 ONNX


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


def class_order(experts: int) -> np.ndarray:
    """The supernet's output column j is concatenated column ``class_order(experts)[j]``."""
    return np.argsort(np.arange(2 * experts) % experts, kind="stable")[::-1].copy()


def supernet_onnx(data: object, experts: int = 5, seed: int = 0) -> onnx.ModelProto:
    """An NN-Factory-like supernet on Fashion-MNIST: stem 784-64 (relu), ``experts`` branches 64-32 (relu) - 2
    reading the stem, their outputs concatenated into 2 * experts logits (branch e: classes 2e, 2e + 1), then
    put in another column order. Random ReLU features; each head a least-squares readout fitted on 3000
    training images."""
    rng = np.random.default_rng(seed)
    xtr, ytr = data.x_train[:3000], data.y_train[:3000]  # type: ignore[attr-defined]
    ws = {"S": (rng.standard_normal((784, 64)) / 28).astype(np.float32)}
    bs = {"S": (0.1 * rng.standard_normal(64)).astype(np.float32)}
    h = np.maximum(xtr @ ws["S"] + bs["S"], 0)
    nodes = [helper.make_node("Gemm", ["x", "W_S", "B_S"], ["s"], transB=1), helper.make_node("Relu", ["s"], ["h"])]
    outs = []
    for e in range(experts):
        ws[f"E{e}"] = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
        bs[f"E{e}"] = (0.1 * rng.standard_normal(32)).astype(np.float32)
        he = np.maximum(h @ ws[f"E{e}"] + bs[f"E{e}"], 0)
        fit = np.linalg.lstsq(np.c_[he, np.ones(len(he))], np.eye(2 * experts)[ytr][:, 2 * e:2 * e + 2], rcond=None)[0]
        ws[f"H{e}"], bs[f"H{e}"] = fit[:-1].astype(np.float32), fit[-1].astype(np.float32)
        nodes += [helper.make_node("Gemm", ["h", f"W_E{e}", f"B_E{e}"], [f"e{e}"], transB=1),
                  helper.make_node("Relu", [f"e{e}"], [f"r{e}"]),
                  helper.make_node("Gemm", [f"r{e}", f"W_H{e}", f"B_H{e}"], [f"o{e}"], transB=1)]
        outs.append(f"o{e}")
    # Then the class order, as torch exports ``logits[:, order]``: Transpose -> GatherND -> Transpose.
    nodes += [helper.make_node("Concat", outs, ["cat"], axis=-1),
              helper.make_node("Transpose", ["cat"], ["cat_t"], perm=[1, 0]),
              helper.make_node("GatherND", ["cat_t", "order"], ["picked"], batch_dims=0),
              helper.make_node("Transpose", ["picked"], ["y"], perm=[1, 0])]
    order = class_order(experts)
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), f"W_{k}") for k, w in ws.items()]
    inits += [numpy_helper.from_array(b, f"B_{k}") for k, b in bs.items()]
    inits.append(numpy_helper.from_array(order.reshape(-1, 1).astype(np.int64), "order"))
    g = helper.make_graph(nodes, "supernet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 784])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2 * experts])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_branches_into_a_concatenation_are_one_kernel() -> None:
    """fp32: the stem, three experts, their concatenation and its column gather as one chain kernel, equal to
    ONNX Runtime."""
    rng = np.random.default_rng(6)
    data = SimpleNamespace(x_train=rng.random((3000, 784), np.float32), y_train=rng.integers(0, 6, 3000))
    model = supernet_onnx(data, experts=3)
    fused, table = build_vm(model, load_profile("x86-avx512"))
    assert [r["kernel"] for r in table] == ["gemv-chain-f32"]
    ref = ort_session(model, 1)
    x = rng.random((1, 784), np.float32)
    np.testing.assert_allclose(fused(x), ref.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_supernet_is_one_kernel_agreeing_with_ort(mode: str, fashion: object, tmp_path: Path) -> None:
    """An int8 supernet (stem, five parallel experts, their concatenation) compiles to one chain kernel: the
    activation quantized in each layer's prologue, requantized between layers on the stack, each expert
    writing its columns of the concatenation, the column gather after it copied out at the end. Same as
    per-layer kernels bit for bit; agrees with ONNX Runtime on the same int8 ONNX in argmax on real
    Fashion-MNIST test images."""
    prof = load_profile("x86-avx512")
    ctx = PassContext(profile=prof, cache=Cache(tmp_path / "cache"), data=fashion, target="tvm")
    model = run(supernet_onnx(fashion), Int8Config(mode=mode, calib_samples=128), ctx).model
    fused, table = build_vm(model, prof)
    layers, ltable = build_vm(model, with_kernels(prof, gemv_chain_max_kb=0))
    assert [r["kernel"] for r in table] == ["gemv-chain-i8"]
    assert [r["kernel"] for r in ltable].count("gemv-packed-i8") == 11
    xs = fashion.x_test[:300]  # type: ignore[attr-defined]
    ours = np.concatenate([fused(x[None]) for x in xs])
    np.testing.assert_array_equal(ours[:30], np.concatenate([layers(x[None]) for x in xs[:30]]))
    sess = ort_session(model, 1)
    theirs = np.concatenate([sess.run(None, {"x": x[None]})[0] for x in xs])
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= ORT_AGREEMENT
    assert np.mean(class_order(5)[ours.argmax(1)] == fashion.y_test[:300]) > 0.6  # type: ignore[attr-defined]  # a real classifier
