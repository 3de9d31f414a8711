"""Grouped (block-sparse) GEMV vs the generic lowering: dense masked graphs and the modular pass's
Gather + batched MatMul form."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from kernels.tvm.testing import block_diagonal, build_vm, dense_onnx, substitute, with_kernels
from kernels.tvm.tir.block_sparse import pack_block_sparse, regroup_columns
from tests.fixtures.synthetic import g2g_masked_mlp
from toolchain.core.profile import load_profile
from toolchain.passes import PassContext
from toolchain.passes._speed import single_layer_model
from toolchain.passes.modular import Config, detect, lowered_nodes, run, timing_models


def test_pack_keeps_only_nonzero_rows() -> None:
    w = block_diagonal(64, 64, 4)
    bs = pack_block_sparse(w, 16)
    assert bs.density == pytest.approx(0.25)
    assert list(bs.kptr[:3]) == [0, 16, 32]
    assert np.array_equal(bs.wv[0], w[bs.kidx[0], :16])


@pytest.mark.parametrize("groups,n", [(4, 256), (8, 200)])
def test_grouped_matches_generic(groups: int, n: int) -> None:
    rng = np.random.default_rng(0)
    w = block_diagonal(256, n, groups)
    b = rng.standard_normal(n).astype(np.float32)
    model = dense_onnx([w, rng.standard_normal((n, 10)).astype(np.float32)], [b, None])
    prof = load_profile("x86-avx512")
    fast, table = build_vm(model, prof)
    generic, _ = build_vm(model, prof, substitute=False)
    assert [r["kernel"] for r in table] == ["grouped-gemv-f32", "gemv-packed-f32"]
    x = rng.standard_normal((1, 256)).astype(np.float32)
    np.testing.assert_allclose(fast(x), generic(x), rtol=1e-4, atol=1e-4)


def test_modular_pass_form_is_recognised() -> None:
    w = block_diagonal(128, 128, 4, seed=3)
    _dense, lowered = timing_models(w, detect(w))
    prof = load_profile("x86-avx512")
    fast, table = build_vm(lowered, prof)
    generic, gtable = build_vm(lowered, prof, substitute=False)
    assert [r["kernel"] for r in table] == ["grouped-gemv-f32"]
    assert len(gtable) >= 2  # generic: take + batched matmul (+ reshape)
    x = np.random.default_rng(1).standard_normal((1, 128)).astype(np.float32)
    np.testing.assert_allclose(fast(x), x @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast(x), generic(x), rtol=1e-4, atol=1e-4)


def test_grouped_off_in_profile_uses_dense_gemv() -> None:
    w = block_diagonal(64, 64, 4)
    _, table = build_vm(dense_onnx([w], [None]), with_kernels(load_profile("x86-avx512"), use_grouped_matmul=False))
    assert [r["kernel"] for r in table] == ["gemv-packed-f32"]


def test_modular_gather_elements_form_is_recognised() -> None:
    w = block_diagonal(128, 128, 4, seed=5)
    nodes, inits = lowered_nodes("x", "y", detect(w), "m", None, gather="elements", static_batch=1)
    model = single_layer_model(nodes, inits, "x", 128, "y")
    fast, table = build_vm(model, load_profile("x86-avx512"))
    assert "grouped-gemv-f32" in [r["kernel"] for r in table]
    x = np.random.default_rng(2).standard_normal((1, 128)).astype(np.float32)
    np.testing.assert_allclose(fast(x), x @ w, rtol=1e-4, atol=1e-4)


def _mixer_g2g(seed: int = 4) -> onnx.ModelProto:
    """A small G2GNet-shaped net (64-256-256-10, 4 groups, 75 % sparse, torch's Gemm layout) whose first
    layer uses the "mixer" grouping: output j belongs to group j % 4 (interleaved, not contiguous)."""
    m = g2g_masked_mlp((64, 256, 256, 10), groups=4, density=0.25, seed=seed, gemm=True)
    perm = np.arange(256).reshape(4, 64).T.ravel()  # contiguous groups -> interleaved
    inits = {t.name: t for t in m.graph.initializer}
    for name, f in (("w0", lambda a: a[perm]), ("b0", lambda a: a[perm]), ("w1", lambda a: a[:, perm])):
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(f(numpy_helper.to_array(inits[name]))), name))
    return m


def test_modular_pass_for_tvm_puts_both_mixer_layers_on_the_grouped_kernel() -> None:
    """The modular pass (target tvm) on a net with mixer grouping: both sparse layers become one grouped
    GEMV each with bias + ReLU fused, the regrouping folded away (no gather / un-permute left), exact vs
    ONNX Runtime on the original dense masked net."""
    m = _mixer_g2g()
    res = run(m, Config(), PassContext(target="tvm"))
    rows = res.report["layers"]
    assert [r["applied"] for r in rows] == [True, True, False] and rows[0]["output_permuted"]
    assert [n.op_type for n in res.model.graph.node].count("Gather") == 2  # one per layer, no un-permute
    prof = load_profile("x86-avx512")
    _, replaced = substitute(res.model, prof)
    assert [(r["kernel"], r["bias"], r["relu"]) for r in replaced] == [
        ("grouped-gemv-f32", True, True), ("grouped-gemv-f32", True, True), ("gemv-packed-f32", True, False)]
    fast, table = build_vm(res.model, prof)
    # nothing generic
    assert [r["kernel"] for r in table] == ["grouped-gemv-f32", "grouped-gemv-f32", "gemv-packed-f32"]
    # the dense masked baseline
    base, btable = build_vm(m, with_kernels(prof, use_grouped_matmul=False, gemv_chain_max_kb=0))
    assert [r["kernel"] for r in btable] == ["gemv-packed-f32"] * 3
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(7).standard_normal((4, 64)).astype(np.float32)
    ref = sess.run(None, {"x": x})[0]
    got = np.concatenate([fast(x[i:i + 1]) for i in range(4)])
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 1e-5
    np.testing.assert_allclose(np.concatenate([base(x[i:i + 1]) for i in range(4)]), ref, rtol=1e-4, atol=1e-5)


def test_dense_masked_mixer_layer_is_regrouped_onto_the_grouped_kernel() -> None:
    """Without the pass: TVM sees the dense masked matrices; the interleaved first layer's outputs are
    regrouped inside the kernel (results scattered back to their columns), so both sparse layers still
    take the grouped GEMV; outputs agree with the dense packed GEMV build."""
    m = _mixer_g2g(seed=5)
    prof = load_profile("x86-avx512")
    _, replaced = substitute(m, prof)
    assert [(r["kernel"], r.get("regrouped")) for r in replaced] == [
        ("grouped-gemv-f32", True), ("grouped-gemv-f32", False), ("gemv-packed-f32", None)]
    assert replaced[0]["density"] <= 0.3  # 4 groups of 64 outputs, 25 % of the inputs each
    assert regroup_columns(block_diagonal(64, 256, 4), 64) is None  # contiguous groups: nothing to gain
    fast, _ = build_vm(m, prof)
    base, _ = build_vm(m, with_kernels(prof, use_grouped_matmul=False))
    x = np.random.default_rng(8).standard_normal((1, 64)).astype(np.float32)
    ref = base(x)
    assert float(np.abs(fast(x) - ref).max() / np.abs(ref).max()) < 1e-5
