"""The bf16 pass's forms: weight-only (the tvm default: weights stored bf16 behind one Cast each, compute
fp32) and compute (bf16 activations, with normalizations kept fp32)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.fixtures.synthetic import random_mlp
from toolchain.passes import PassContext, parse_pass


def apply(model: onnx.ModelProto, text: str, target: str) -> object:
    spec, cfg = parse_pass(text)
    res = spec.fn()(model, cfg, PassContext(target=target))
    onnx.checker.check_model(res.model, full_check=True)
    return res


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


X = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)


def test_form_auto_is_weights_on_tvm_and_compute_elsewhere() -> None:
    m = random_mlp([64, 32, 10])
    assert apply(m, "bf16", "tvm").report["form"] == "weights"
    assert apply(m, "bf16", "tensorrt").report["form"] == "compute"
    assert apply(m, "bf16", "ort").report["form"] == "compute"
    assert apply(m, "fp16", "tvm").report["form"] == "compute"  # weight-only is for bfloat16
    assert apply(m, "bf16=form=compute", "tvm").report["form"] == "compute"


def test_weights_form_halves_the_weight_bytes_and_keeps_fp32_compute() -> None:
    m = random_mlp([64, 128, 64, 10])
    res = apply(m, "bf16", "tvm")
    g = res.model.graph
    inits = {t.name: t for t in g.initializer}
    weights = [t for t in inits.values() if len(t.dims) == 2]
    assert weights and all(t.data_type == TensorProto.BFLOAT16 for t in weights)
    assert all(t.data_type == TensorProto.FLOAT for t in inits.values() if len(t.dims) < 2)  # biases
    casts = [n for n in g.node if n.op_type == "Cast"]
    assert len(casts) == len(weights) and list(g.node[: len(casts)]) == casts  # one per weight, at the top
    assert res.report["weights_half"] == len(weights)
    assert 0.45 < res.report["initializer_bytes"] / res.report["initializer_bytes_fp32"] < 0.55
    # Everything after the casts is the fp32 graph: ONNX Runtime runs it, within bf16's weight rounding.
    got, want = ort_run(res.model, X), ort_run(m, X)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 2e-2
    assert float(np.mean(got.argmax(1) == want.argmax(1))) >= 0.9


def test_weights_form_block_keeps_a_layer_fp32() -> None:
    m = random_mlp([64, 32, 10])
    first = m.graph.node[0]
    res = apply(m, f"bf16=block={first.name}", "tvm")
    assert res.report["weights_fp32"] == 1 and res.report["weights_half"] == 1
    assert first.input[1] in {t.name for t in res.model.graph.initializer if t.data_type == TensorProto.FLOAT}


def test_weights_form_stores_conv_weights_and_keeps_the_graph_order_valid() -> None:
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = apply(m, "bf16", "tvm")
    assert [t.data_type for t in res.model.graph.initializer] == [TensorProto.BFLOAT16]
    x = np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ort_run(res.model, x), ort_run(m, x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("op", ["LayerNormalization", "BatchNormalization"])
def test_compute_form_keeps_normalizations_fp32(op: str) -> None:
    """TVM's layer_norm takes fp32 / fp16 only: a bf16 one stopped the tvm build with an internal error."""
    n = 8
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
    if op == "LayerNormalization":
        node = helper.make_node(op, ["h", "s", "b"], ["y"], axis=-1)
        inits = [numpy_helper.from_array(ones, "s"), numpy_helper.from_array(zeros, "b")]
        shape = [1, n]
    else:
        node = helper.make_node(op, ["h", "s", "b", "mu", "var"], ["y"])
        inits = [numpy_helper.from_array(a, k) for a, k in ((ones, "s"), (zeros, "b"), (zeros, "mu"), (ones, "var"))]
        shape = [1, n, 2, 2]
    w = numpy_helper.from_array(np.eye(n, dtype=np.float32), "w")
    mm = helper.make_node("MatMul", ["x", "w"], ["h"]) if op == "LayerNormalization" else \
        helper.make_node("Conv", ["x", "w4"], ["h"])
    if op != "LayerNormalization":
        w = numpy_helper.from_array(np.eye(n, dtype=np.float32).reshape(n, n, 1, 1), "w4")
    g = helper.make_graph([mm, node], "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [w, *inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = apply(m, "bf16=form=compute", "tvm")
    norm = next(n for n in res.model.graph.node if n.op_type == op)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*res.model.graph.value_info, *res.model.graph.output]}
    inits_t = {t.name: t.data_type for t in res.model.graph.initializer}
    assert all(types.get(v, inits_t.get(v)) == TensorProto.FLOAT for v in [*norm.input, *norm.output])
    # The MatMul runs in bf16; ONNX's Conv schema has no bfloat16, so the conv stays fp32 (a valid model).
    assert res.report["nodes_half"] == (1 if op == "LayerNormalization" else 0)
