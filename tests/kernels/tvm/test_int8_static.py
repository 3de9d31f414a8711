"""Static (calibrated) int8 on TVM: the int8 pass gives the tvm target the integer form (MatMulInteger with
int8 weights) instead of QDQ, whose dequantized constant weights TVM folds back to fp32; TVM runs each layer as
one int8 dot-product kernel (the activation's QuantizeLinear in its prologue, the dequantization, bias and the
QDQ / relu steps after it in its epilogue), a chain of them as one kernel, and agrees with ONNX Runtime's QDQ
model on real Fashion-MNIST inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kernels.tvm.testing import build_vm, dense_onnx, with_kernels
from toolchain.core.cache import Cache
from toolchain.core.onnx_io import ort_session
from toolchain.core.profile import load_profile
from toolchain.passes import PassContext
from toolchain.passes._quant import qdq_to_integer
from toolchain.passes.int8 import Config, run
from toolchain.zoo.datasets.base import Dataset

ORT_AGREEMENT = 0.99


def classifier(data: Dataset) -> onnx.ModelProto:
    """784-256-10: random ReLU features and a least-squares readout fitted on 3000 training images."""
    rng = np.random.default_rng(0)
    xtr, ytr = data.x_train[:3000], data.y_train[:3000]
    w1 = (rng.standard_normal((784, 256)) / 28).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(256)).astype(np.float32)
    h = np.maximum(xtr @ w1 + b1, 0)
    w2 = np.linalg.lstsq(np.c_[h, np.ones(len(h))], np.eye(10)[ytr], rcond=None)[0].astype(np.float32)
    return dense_onnx([w1, w2[:-1]], [b1, w2[-1]], gemm=True)


def static_int8(model: onnx.ModelProto, data: Dataset, target: str, tmp_path: Path) -> tuple[onnx.ModelProto, dict]:
    ctx = PassContext(profile=load_profile("x86-avx512"), cache=Cache(tmp_path / "cache"), data=data, target=target)
    res = run(model, Config(mode="static", calib_samples=128), ctx)
    return res.model, res.report


def test_static_int8_for_tvm_keeps_int8_weights(fashion: Dataset, tmp_path: Path) -> None:
    model = classifier(fashion)
    qdq, qdq_report = static_int8(model, fashion, "ort", tmp_path)
    integer, report = static_int8(model, fashion, "tvm", tmp_path)
    assert "integer_form" in qdq_report and qdq_report["integer_form"] == []  # ONNX Runtime keeps QDQ
    assert [n.op_type for n in qdq.graph.node].count("MatMulInteger") == 0
    assert report["integer_form"] == ["Gemm_0", "Gemm_2"]
    ops = [n.op_type for n in integer.graph.node]
    assert ops.count("MatMulInteger") == 2 and "Gemm" not in ops
    weights = [numpy_helper.to_array(t) for t in integer.graph.initializer if t.name.endswith("__wq_kn")]
    assert [w.dtype for w in weights] == [np.int8, np.int8] and [w.shape for w in weights] == [(784, 256), (256, 10)]
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in integer.graph.initializer
                      if t.data_type == onnx.TensorProto.FLOAT)
    assert float_bytes < 4096  # scales and biases only: no fp32 copy of a weight

    fast, table = build_vm(integer, load_profile("x86-avx512"))
    assert [r["kernel"] for r in table] == ["gemv-chain-i8"]  # both layers, quantize to dequantize: one kernel
    # Per layer: one kernel each, nothing else (no separate quantize / dequantize / relu kernels).
    per_layer, ltable = build_vm(integer, with_kernels(load_profile("x86-avx512"), gemv_chain_max_kb=0))
    assert [r["kernel"] for r in ltable] == ["gemv-packed-i8"] * 2
    xs = fashion.x_test[:400]
    ort = ort_session(qdq, 1)
    theirs = np.concatenate([ort.run(None, {"x": x[None]})[0] for x in xs])
    ours = np.concatenate([fast(x[None]) for x in xs])
    np.testing.assert_array_equal(ours[:50], np.concatenate([per_layer(x[None]) for x in xs[:50]]))
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= ORT_AGREEMENT
    assert np.max(np.abs(ours - theirs)) <= 0.05 * np.max(np.abs(theirs))
    ref = ort_session(integer, 1)  # the integer form itself, on ONNX Runtime: the same model
    again = np.concatenate([ref.run(None, {"x": x[None]})[0] for x in xs[:50]])
    np.testing.assert_allclose(again, theirs[:50], atol=0.05 * np.max(np.abs(theirs)))


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_qdq_to_integer_matches_qdq_semantics(op: str) -> None:
    """On a hand-built QDQ layer (per-channel weight scales, uint8 activation with a zero point, a bias),
    the integer form computes DQ(xq) @ DQ(W) + b up to float rounding."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    k, n = 40, 24
    wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
    sw = rng.uniform(0.001, 0.01, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    w_in = wq.T.copy() if op == "Gemm" else wq
    inits = [numpy_helper.from_array(w_in, "Wq"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(n, np.int8), "zw"), numpy_helper.from_array(np.float32(0.02), "sx"),
             numpy_helper.from_array(np.uint8(117), "zx"), numpy_helper.from_array(bias, "B")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["W"], axis=0 if op == "Gemm" else 1)]
    if op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["xd", "W", "B"], ["y"], transB=1, name="layer"))
    else:
        nodes += [helper.make_node("MatMul", ["xd", "W"], ["m"], name="layer"),
                  helper.make_node("Add", ["m", "B"], ["y"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    integer, done = qdq_to_integer(model)
    assert done == ["layer"]
    assert "DequantizeLinear" not in [nd.op_type for nd in integer.graph.node]
    x = rng.standard_normal((1, k)).astype(np.float32)
    xq = np.clip(np.round(x / 0.02) + 117, 0, 255)
    expect = ((xq - 117) * 0.02) @ (wq.astype(np.float32) * sw) + bias
    got = ort_session(integer, 1).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)
    fast, table = build_vm(integer, load_profile("x86-avx512"))
    assert [r["kernel"] for r in table].count("gemv-packed-i8") == 1
    np.testing.assert_allclose(fast(x), expect, rtol=1e-4, atol=1e-4)
