"""Sparsity passes: structure after the pass, agreement with ONNX Runtime, full ONNX check, honest reports."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from tests.fixtures.synthetic import g2g_masked_mlp, mlp_model, random_mlp
from toolchain.core.errors import GateFailure, UsageError
from toolchain.passes import PassContext, parse_pass
from toolchain.passes._graph import dense_layers, get_weight
from toolchain.passes._speed import MIN_GAIN
from toolchain.passes.nm import apply_nm, verify_nm


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def apply(model: onnx.ModelProto, text: str):
    spec, cfg = parse_pass(text)
    res = spec.fn()(model, cfg, PassContext())
    onnx.checker.check_model(res.model, full_check=True)
    return res


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


X = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)


def weights(m: onnx.ModelProto) -> list[np.ndarray]:
    return [get_weight(m, ly) for ly in dense_layers(m)]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_density_and_graph(scope: str) -> None:
    m = random_mlp([64, 48, 32, 10])
    res = apply(m, f"prune=density=0.3,scope={scope}")
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in m.graph.node]
    before, after = weights(m), weights(res.model)
    total = sum(w.size for w in after)
    assert sum(np.count_nonzero(w) for w in after) / total == pytest.approx(0.3, abs=0.01)
    for wb, wa in zip(before, after, strict=True):
        kept = wa != 0
        np.testing.assert_array_equal(wa[kept], wb[kept])  # survivors untouched
        if scope == "layer":
            assert kept.mean() == pytest.approx(0.3, abs=0.01)
        assert np.abs(wb[~kept]).max() <= np.abs(wb[kept]).min() + 1e-7 or scope == "global"
    # ORT runs the pruned graph exactly as the pruned weights say (numpy forward with the same weights).
    h = X
    for i, w in enumerate(after):
        b = numpy_helper.to_array(next(t for t in res.model.graph.initializer if t.name == f"b{i}"))
        h = h @ w + b
        h = np.maximum(h, 0) if i < len(after) - 1 else h
    assert rel(ort_run(res.model, X), h) < 1e-5
    assert res.report["note"].startswith("ONNX Runtime runs MatMul/Gemm densely")


def test_prune_only_if_faster_never_applies_a_slower_layer() -> None:
    m = random_mlp([256, 256, 10])
    res = apply(m, "prune=density=0.25,only_if_faster=true")
    for row, wb, wa in zip(res.report["layers"], weights(m), weights(res.model), strict=True):
        assert "speedup" in row and row["measured_on"] == "ort"
        if row["applied"]:
            assert row["speedup"] >= MIN_GAIN
        else:
            np.testing.assert_array_equal(wa, wb)  # kept dense = untouched
    assert res.modified == any(r["applied"] for r in res.report["layers"])


def test_nm_pattern_verified_and_agrees() -> None:
    m = random_mlp([64, 32, 12], gemm=False)
    res = apply(m, "nm")
    for w in weights(res.model):
        assert verify_nm(w, 2, 4) == 0
        assert np.count_nonzero(w) == w.size // 2
    bad = np.ones((8, 3), np.float32)
    assert verify_nm(bad, 2, 4) == 6
    assert verify_nm(apply_nm(np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32), 2, 4), 2, 4) == 0
    assert res.report["layers"][0]["verified"] is True


def test_nm_on_model_without_matmul_is_one_line_usage_error() -> None:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "r",
                          [helper.make_tensor_value_info("x", 1, [1, 4])],
                          [helper.make_tensor_value_info("y", 1, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    with pytest.raises(UsageError) as e:
        apply(m, "nm")
    assert "\n" not in str(e.value) and "no MatMul/Gemm" in str(e.value)


def test_nm_bad_config_is_usage_error() -> None:
    with pytest.raises(UsageError):
        parse_pass("nm=n=4,m=4")
    assert GateFailure  # raised by the pass itself if a pattern were ever violated


def test_structured_removes_dead_neurons_exactly() -> None:
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((64, 40)).astype(np.float32)
    b0 = rng.standard_normal(40).astype(np.float32)
    w1 = rng.standard_normal((40, 10)).astype(np.float32)
    w0[:, ::2] = 0.0
    b0[::2] = 0.0
    m = mlp_model([w0, w1], [b0, np.zeros(10, np.float32)])
    res = apply(m, "structured=keep=0.5,align=1")
    assert [w.shape for w in weights(res.model)] == [(64, 20), (20, 10)]
    assert res.report["layers"][0]["dead_removed"] == 20
    assert rel(ort_run(res.model, X), ort_run(m, X)) < 1e-5


def test_structured_slices_to_the_masked_network() -> None:
    m = random_mlp([64, 64, 32, 10], gemm=False)
    res = apply(m, "structured=keep=0.5,align=8")
    assert [w.shape for w in weights(res.model)] == [(64, 32), (32, 16), (16, 10)]
    # One chain sliced == the same network with the removed neurons' weights and biases zeroed (Relu(0) = 0).
    single = apply(m, "structured=keep=0.5,align=8,layers=fc0")
    w_old, w_new = weights(m)[0], weights(single.model)[0]
    kept = [int(np.flatnonzero((w_old == w_new[:, j:j + 1]).all(0))[0]) for j in range(w_new.shape[1])]
    mask = np.zeros(w_old.shape[1], bool)
    mask[kept] = True
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    inits = {t.name: t for t in ref.graph.initializer}
    b = numpy_helper.to_array(inits["b0"])
    inits["w0"].CopyFrom(numpy_helper.from_array(np.where(mask, w_old, 0).astype(np.float32), "w0"))
    inits["b0"].CopyFrom(numpy_helper.from_array(np.where(mask, b, 0).astype(np.float32), "b0"))
    assert rel(ort_run(single.model, X), ort_run(ref, X)) < 1e-5


@pytest.mark.parametrize("gemm,gather", [(True, "take"), (False, "take"), (True, "elements"), (False, "auto")])
def test_modular_lowering_is_exact(gemm: bool, gather: str) -> None:
    m = g2g_masked_mlp((64, 128, 128, 10), groups=8, density=0.25, seed=3, gemm=gemm)
    res = apply(m, f"modular=gather={gather}")
    ops = [n.op_type for n in res.model.graph.node]
    if gather == "take":
        assert ops.count("Gather") == 2 and ops.count("Reshape") == 2
        shapes = sorted(tuple(t.dims) for t in res.model.graph.initializer if len(t.dims) == 3)
        assert shapes == [(8, 1, 16), (8, 1, 32), (8, 16, 16), (8, 32, 16)]
    else:  # auto on ort = GatherElements over batch-expanded indices (X has batch 32)
        assert res.report["gather"] == "elements" and ops.count("GatherElements") == 2 and "Gather" not in ops
        shapes = sorted(tuple(t.dims) for t in res.model.graph.initializer if len(t.dims) == 3)
        assert shapes == [(8, 16, 16), (8, 32, 16)]
    assert ops.count("MatMul") + ops.count("Gemm") == 3  # two grouped + the untouched dense head
    rows = res.report["layers"]
    assert [r["applied"] for r in rows] == [True, True, False]
    assert rows[0]["groups"] == 8 and rows[0]["k"] == 16 and rows[1]["k"] == 32
    assert "no block structure" in rows[2]["why"]
    assert rel(ort_run(res.model, X), ort_run(m, X)) < 1e-5


def test_modular_pads_unequal_groups_and_leaves_dense_alone() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    mask = np.zeros_like(w, bool)
    for g in range(4):
        mask[rng.choice(64, 6 + 3 * g, replace=False), g * 8:(g + 1) * 8] = True  # K differs per group
    m = mlp_model([w * mask, rng.standard_normal((32, 10)).astype(np.float32)], [None, None], gemm=False)
    res = apply(m, "modular")
    assert res.report["layers"][0]["k"] == 15
    assert rel(ort_run(res.model, X), ort_run(m, X)) < 1e-5
    dense = random_mlp([64, 32, 10])
    r2 = apply(dense, "modular")
    assert not r2.modified and all(not r["applied"] for r in r2.report["layers"])


def test_modular_measured_report() -> None:
    m = g2g_masked_mlp((256, 512, 10), groups=8, density=0.25)
    res = apply(m, "modular=measure=true,only_if_faster=true")
    row = res.report["layers"][0]
    assert row["measured_on"] == "ort" and row["dense_p50_us"] > 0 and row["sparse_p50_us"] > 0
    assert row["applied"] == (row["speedup"] >= MIN_GAIN)


def test_modular_finds_interleaved_groups() -> None:
    """G2GNet's "mixer" grouping interleaves output groups (neuron j in group j % G): the pass regroups the
    outputs by shared inputs and puts them back in order with a final Gather; still exact."""
    m = g2g_masked_mlp((64, 128, 10), groups=8, density=0.25, seed=2, gemm=False)
    w = next(t for t in m.graph.initializer if t.name == "w0")
    a = numpy_helper.to_array(w)
    perm = np.arange(128).reshape(8, 16).T.ravel()  # contiguous groups -> interleaved
    w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a[:, perm]), "w0"))
    res = apply(m, "modular=gather=take")
    row = res.report["layers"][0]
    assert row["applied"] and row["groups"] == 8 and row["k"] == 16 and row["output_permuted"]
    # the permutation is folded into the bias and the next layer's rows: no un-permute Gather
    assert [n.op_type for n in res.model.graph.node][:4] == ["Gather", "MatMul", "Reshape", "Add"]
    assert rel(ort_run(res.model, X), ort_run(m, X)) < 1e-5
    # both layers regrouped and lowered: the second layer's gather reads the permuted positions
    m2 = g2g_masked_mlp((64, 128, 128, 10), groups=8, density=0.25, seed=4, gemm=True)
    w = next(t for t in m2.graph.initializer if t.name == "w0")  # Gemm layout [out, in]
    w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w)[perm]), "w0"))
    b = next(t for t in m2.graph.initializer if t.name == "b0")
    b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b)[perm], "b0"))
    w1 = next(t for t in m2.graph.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w1)[:, perm]), "w1"))
    r2 = apply(m2, "modular=gather=take")
    assert [r["applied"] for r in r2.report["layers"]] == [True, True, False]
    assert r2.report["layers"][0]["output_permuted"]
    assert [n.op_type for n in r2.model.graph.node].count("Gather") == 2
    assert rel(ort_run(r2.model, X), ort_run(m2, X)) < 1e-5
    # a regrouped layer whose output is the graph output keeps the un-permute Gather
    single = mlp_model([numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w0"))], [None],
                       gemm=False)
    r3 = apply(single, "modular=gather=take")
    assert [n.op_type for n in r3.model.graph.node] == ["Gather", "MatMul", "Reshape", "Gather"]
    assert rel(ort_run(r3.model, X), ort_run(single, X)) < 1e-5


def test_modular_batch1_pins_batch_and_drops_index_expansion() -> None:
    m = g2g_masked_mlp((64, 128, 128, 10), groups=8, density=0.25, seed=3)
    res = apply(m, "modular=batch1=true")
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("GatherElements") == 2 and "Expand" not in ops and "Shape" not in ops
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    for i in range(4):
        assert rel(ort_run(res.model, X[i:i + 1]), ort_run(m, X[i:i + 1])) < 1e-5
