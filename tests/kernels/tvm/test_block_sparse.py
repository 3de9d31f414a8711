"""Grouped (block-sparse) GEMV vs the generic lowering: dense masked graphs and the modular pass's
Gather + batched MatMul form; the grouped int8 GEMV on a G2GNet-shaped int8 net vs ONNX Runtime's int8 on real
Fashion-MNIST images, and its dot-product instructions per ISA (vpdpbusd, vpmaddubsw, sdot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from kernels.tvm.testing import block_diagonal, build_vm, dense_onnx, substitute, with_kernels
from kernels.tvm.tir.block_sparse import pack_block_sparse, regroup_columns
from tests.fixtures.disassembly import assert_instructions, built_library, function_bodies, objdump_for
from tests.fixtures.synthetic import g2g_masked_mlp
from toolchain.core.profile import load_profile
from toolchain.passes import PassContext
from toolchain.passes._speed import single_layer_model
from toolchain.passes.int8 import Config as Int8Config
from toolchain.passes.int8 import run as run_int8
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


# --- int8: the grouped GEMV on the CPU's int8 dot products, on the int8 pass's dynamic-int8 layers ---

ORT_AGREEMENT = 0.99  # share of real Fashion-MNIST test images whose argmax matches ONNX Runtime's int8


def _int8_g2g(profile_id: str, seed: int = 11) -> onnx.ModelProto:
    """A G2GNet-shaped 784-256-256-10 net (8 groups, 25 % dense, foreign inputs per group; the first layer in
    the mixer grouping) through the int8 pass (dynamic, as the search builds it) for ``profile_id``."""
    m = g2g_masked_mlp((784, 256, 256, 10), groups=8, density=0.25, seed=seed, gemm=True)
    perm = np.arange(256).reshape(8, 32).T.ravel()  # contiguous groups -> interleaved
    inits = {t.name: t for t in m.graph.initializer}
    for name, f in (("w0", lambda a: a[perm]), ("b0", lambda a: a[perm]), ("w1", lambda a: a[:, perm])):
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(f(numpy_helper.to_array(inits[name]))), name))
    return run_int8(m, Int8Config(mode="dynamic"), PassContext(profile=load_profile(profile_id), target="tvm")).model


@pytest.mark.parametrize("profile_id", ["x86-avx512", pytest.param("x86-avx2", marks=pytest.mark.slow)])
def test_grouped_int8_agrees_with_ort_int8_on_fashion_mnist(profile_id: str, fashion: object) -> None:
    """Both sparse layers (one regrouped) take the grouped int8 kernel with the dynamic quantization fused;
    on real Fashion-MNIST test images the logits agree with ONNX Runtime's int8 on the same ONNX."""
    model = _int8_g2g(profile_id)
    fast, table = build_vm(model, load_profile(profile_id))
    names = [r["kernel"] for r in table]
    assert names.count("grouped-gemv-i8") == 2 and all(r["origin"] != "generic" for r in table), table
    _, replaced = substitute(model, load_profile(profile_id))
    assert [r.get("regrouped") for r in replaced if r["kernel"] == "grouped-gemv-i8"] == [True, False]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    xs = fashion.x_test[:300].reshape(300, 784).astype(np.float32)  # type: ignore[attr-defined]
    ours = np.concatenate([fast(x[None]) for x in xs])
    want = np.concatenate([sess.run(None, {model.graph.input[0].name: x[None]})[0] for x in xs])
    assert np.mean(ours.argmax(1) == want.argmax(1)) >= ORT_AGREEMENT
    assert float(np.abs(ours - want).max()) <= 0.05 * float(np.abs(want).max())


@pytest.mark.parametrize(("profile_id", "present", "absent"), [
    ("x86-avx512", [r"\bvpdpbusd\b"], []),
    ("x86-avx2", [r"\bvpmaddubsw\b", r"\bvpmaddwd\b"], [r"\bvpdpbusd\b", r"zmm"]),  # a Haswell: no VNNI, no AVX-512
    ("rpi5", [r"\bsdot\b"], []),
])
def test_grouped_int8_uses_the_dot_product_instructions(profile_id: str, present: list[str], absent: list[str],
                                                        tmp_path: Path) -> None:
    prof = load_profile(profile_id)
    lib = tmp_path / "lib.so"
    meta = built_library(_int8_g2g(profile_id), prof, lib)
    assert [r["kernel"] for r in meta["kernels"]].count("grouped-gemv-i8") == 2, meta["kernels"]
    bodies = function_bodies(lib, objdump_for(prof),
                             lambda sym: "grouped_gemv_i8" in sym and sym.endswith("_compute_"))
    assert len(bodies) == 3, sorted(bodies)  # the two grouped kernels' bodies and the whole library
    assert_instructions(bodies, present, absent)
