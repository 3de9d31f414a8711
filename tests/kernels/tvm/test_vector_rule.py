"""The vector rule and fast exp (kernels/tvm/schedule/vector_rule.py, kernels/tvm/passes/fast_math.py) against
ONNX Runtime and numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper

from kernels.tvm.schedule.vector_rule import _count
from kernels.tvm.testing import build_vm, with_kernels
from targets.tvm.frontend import import_onnx
from targets.tvm.pipeline import pipeline
from toolchain.core.profile import load_profile


def _conv_kan_block(seed: int = 0) -> onnx.ModelProto:
    """A Conv-KAN block as the zoo exports it: normalize, RBF expansion (exp), SiLU base channel
    (sigmoid), concat, Conv, MaxPool, plus a Reshape: every kernel here is one the rule must schedule."""
    rng = np.random.default_rng(seed)
    c, k, co = 3, 4, 8
    inits = {
        "mean": rng.standard_normal((1, c, 1, 1)).astype(np.float32) * 0.1,
        "std": (1 + rng.random((1, c, 1, 1))).astype(np.float32),
        "centers": np.linspace(-2, 2, k, dtype=np.float32).reshape(1, 1, 1, 1, k),
        "scale": np.array(1.5, np.float32),
        "five": np.array([1, c, 13, 13, 1], np.int64),
        "flat": np.array([1, c * k, 13, 13], np.int64),
        "w": (rng.standard_normal((co, c * (k + 1), 3, 3)) * 0.2).astype(np.float32),
        "b": rng.standard_normal(co).astype(np.float32),
        "out": np.array([1, co * 6 * 6], np.int64),
    }
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["xc"]),
        helper.make_node("Div", ["xc", "std"], ["z"]),
        helper.make_node("Reshape", ["z", "five"], ["z5"]),
        helper.make_node("Sub", ["z5", "centers"], ["d"]),
        helper.make_node("Mul", ["d", "scale"], ["ds"]),
        helper.make_node("Mul", ["ds", "ds"], ["sq"]),
        helper.make_node("Neg", ["sq"], ["nsq"]),
        helper.make_node("Exp", ["nsq"], ["phi"]),
        helper.make_node("Transpose", ["phi"], ["phit"], perm=[0, 1, 4, 2, 3]),
        helper.make_node("Reshape", ["phit", "flat"], ["phif"]),
        helper.make_node("Sigmoid", ["x"], ["sg"]),
        helper.make_node("Mul", ["x", "sg"], ["silu"]),
        helper.make_node("Concat", ["silu", "phif"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w", "b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["conv"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["pool", "out"], ["y"]),
    ]
    g = helper.make_graph(nodes, "convkan_block",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 13, 13])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, co * 6 * 6])],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("profile_id", ["x86-avx512", "x86-avx2"])
def test_rule_schedules_every_kernel_and_matches_ort(profile_id: str) -> None:
    model = _conv_kan_block()
    prof = with_kernels(load_profile(profile_id), use_direct_conv=False)  # the rule's conv, not the direct kernel
    run, table = build_vm(model, prof)
    assert {r["origin"] for r in table} == {"rule"}, table  # conv and pooling included: nothing naive left
    _, off = build_vm(model, with_kernels(prof, vector_rule=False, fast_exp=False))
    assert {r["origin"] for r in off} == {"generic"}  # the switch is real: off, TVM leaves naive loops
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 3, 13, 13)).astype(np.float32) * 2
        ref = _ort(model, x)
        got = run(x)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_rule_vectorizes_elementwise_and_pooling_loops() -> None:
    prof = with_kernels(load_profile("x86-avx512"), use_direct_conv=False)  # the direct conv would take the pool
    mod = import_onnx(_conv_kan_block())
    for name, step in pipeline(prof):
        mod = step(mod)
        if name == "vector-rule":
            break
    vectorized = []
    for gv, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            kinds: list[int] = []
            tvm_ffi.structural_walk(f.body, [(tvm.tirx.For, lambda n, kinds=kinds: kinds.append(int(n.kind)))],
                                    order="post")
            if int(tvm.tirx.ForKind.VECTORIZED) in kinds:
                vectorized.append(gv.name_hint)
    assert any("exp" in n for n in vectorized), vectorized  # the basis expansion, inlined into one vector loop
    assert any("pool" in n for n in vectorized), vectorized


def test_fast_exp_and_sigmoid_relative_error() -> None:
    x = np.concatenate([np.linspace(-87.0, 88.0, 200_001, dtype=np.float32),
                        np.random.default_rng(0).standard_normal(50_000).astype(np.float32) * 4])
    nodes = [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("Sigmoid", ["x"], ["s"])]
    g = helper.make_graph(nodes, "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [len(x)]) for n in ("e", "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    run, _ = build_vm(m, load_profile("x86-avx512"))
    out = run.raw(tvm.runtime.tensor(x))  # type: ignore[attr-defined]
    e, s = out[0].numpy(), out[1].numpy()
    xd = x.astype(np.float64)
    rel_e = np.abs(e - np.exp(xd)) / np.exp(xd)
    rel_s = np.abs(s - 1 / (1 + np.exp(-xd))) / (1 / (1 + np.exp(-xd)))
    assert float(rel_e.max()) < 5e-7, float(rel_e.max())  # ~4 ulp of float32 (measured 8.3e-8; TOPI fast_exp: 3.1e-7)
    assert float(rel_s.max()) < 2e-6, float(rel_s.max())  # 1 / (1 + e^-x): the division adds rounding (measured 1.4e-7)


def test_inlining_a_recurrence_stays_linear() -> None:
    """y <- y * y / 2 + x, 12 times (each step reads the last twice, like an unrolled LIF membrane): inlining
    every step would copy the first 2^12 times (measured: 106k IR nodes, 1.5k with the guard; an unrolled
    T=16 LIF did not compile in 10 min). The rule must keep the function linear in the chain, and correct."""
    steps = 12
    nodes, prev = [], "x"
    for t in range(steps):
        nodes += [helper.make_node("Mul", [prev, prev], [f"sq{t}"]),
                  helper.make_node("Mul", [f"sq{t}", "half"], [f"h{t}"]),
                  helper.make_node("Add", [f"h{t}", "x"], [f"y{t}"])]  # y*y/2 + x: bounded for |x| < 1/2
        prev = f"y{t}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                          [numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    prof = load_profile("x86-avx512")
    mod = import_onnx(m)
    for name, step in pipeline(prof):
        mod = step(mod)
        if name == "vector-rule":
            break
    for f in mod.functions.values():
        if isinstance(f, tvm.tirx.PrimFunc):
            size = _count(f.body, object)
            assert size < 600 * steps, size  # linear: ~200 IR nodes per step; inlined blindly: ~2^12 copies
    run, table = build_vm(m, prof)
    assert {r["origin"] for r in table} == {"rule"}
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 64)).astype(np.float32)
    np.testing.assert_allclose(run(x), _ort(m, x), rtol=1e-5, atol=1e-6)
