"""Grouped (block-sparse) GEMV vs the generic lowering: dense masked graphs and the modular pass's
Gather + batched MatMul form."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.tvm.block_sparse import pack_block_sparse
from kernels.tvm.harness import block_diagonal, build_vm, dense_onnx, with_kernels
from toolchain.profile import load_profile


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
    from toolchain.passes.modular import detect, timing_models

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
    from toolchain.passes._speed import single_layer_model
    from toolchain.passes.modular import detect, lowered_nodes

    w = block_diagonal(128, 128, 4, seed=5)
    nodes, inits = lowered_nodes("x", "y", detect(w), "m", None, gather="elements", static_batch=1)
    model = single_layer_model(nodes, inits, "x", 128, "y")
    fast, table = build_vm(model, load_profile("x86-avx512"))
    assert "grouped-gemv-f32" in [r["kernel"] for r in table]
    x = np.random.default_rng(2).standard_normal((1, 128)).astype(np.float32)
    np.testing.assert_allclose(fast(x), x @ w, rtol=1e-4, atol=1e-4)
