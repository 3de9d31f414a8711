"""Packed GEMV kernel vs the generic lowering (and numpy) on random inputs."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernels.tvm.testing import build_vm, dense_onnx, with_kernels
from kernels.tvm.tir.gemv import choose_block_n, pack_weight
from toolchain.core.profile import load_profile
from toolchain.passes.int8 import Config, run


def test_pack_weight_layout() -> None:
    w = np.arange(5 * 20, dtype=np.float32).reshape(5, 20)
    p = pack_weight(w, 8)
    assert p.shape == (2 * 5 * 8 + 5 * 4,)  # two full blocks, then the 4-column tail: no padding to 8
    full = p[:80].reshape(2, 5, 8)
    assert full[1, 2, 3] == w[2, 11]
    np.testing.assert_array_equal(p[80:].reshape(5, 4), w[:, 16:])
    t = pack_weight(w[:, :19], 8)[80:].reshape(5, 4)  # a 3-column tail is padded to TAIL_ALIGN
    np.testing.assert_array_equal(t[:, :3], w[:, 16:19])
    assert np.all(t[:, 3] == 0)


def test_choose_block_n_whole_vectors() -> None:
    assert choose_block_n(256, 64, 16) == 64
    assert choose_block_n(10, 64, 16) == 16
    assert choose_block_n(10, 16, 4) == 12


@pytest.mark.parametrize("profile_id", ["x86-avx512", "x86-avx2"])
@pytest.mark.parametrize("gemm", [False, True])
def test_gemv_matches_generic(profile_id: str, gemm: bool) -> None:
    rng = np.random.default_rng(1)
    dims = [97, 70, 33, 10]  # odd sizes: tails in K (unroll) and N (block)
    ws = [rng.standard_normal((a, c)).astype(np.float32) for a, c in itertools.pairwise(dims)]
    bs: list[np.ndarray | None] = [rng.standard_normal(c).astype(np.float32) for c in dims[1:]]
    if not gemm:
        bs[1] = None  # a layer without bias: matmul + relu only
    model = dense_onnx(ws, bs, relu=True, gemm=gemm)
    prof = with_kernels(load_profile(profile_id), gemv_chain_max_kb=0)  # per-layer kernels (test_chain: fused)
    fast, table = build_vm(model, prof)
    generic, gtable = build_vm(model, prof, substitute=False)
    assert [r["kernel"] for r in table] == ["gemv-packed-f32"] * 3
    assert all(r["origin"] == "generic" for r in gtable)
    x = rng.standard_normal((1, dims[0])).astype(np.float32)
    ref = x
    for i, (w, bias) in enumerate(zip(ws, bs)):
        ref = ref @ w + (bias if bias is not None else 0)
        if i < 2:
            ref = np.maximum(ref, 0)
    np.testing.assert_allclose(fast(x), generic(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast(x), ref, rtol=1e-4, atol=1e-4)


def test_generic_variant_is_not_substituted() -> None:
    rng = np.random.default_rng(2)
    model = dense_onnx([rng.standard_normal((16, 8)).astype(np.float32)], [None])
    _, table = build_vm(model, with_kernels(load_profile("x86-avx512"), use_gemv=False))
    assert [r["origin"] for r in table] == ["rule"]  # no hand-written kernel: the vector rule schedules it
    _, table = build_vm(model, with_kernels(load_profile("x86-avx512"), use_gemv=False, vector_rule=False))
    assert [r["origin"] for r in table] == ["generic"]


def test_rank3_input_is_reshaped() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["y"])],
                          "r3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 40])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 24])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    fast, table = build_vm(model, load_profile("x86-avx512"))
    assert [r["kernel"] for r in table] == ["gemv-packed-f32"]
    x = rng.standard_normal((1, 2, 40)).astype(np.float32)
    np.testing.assert_allclose(fast(x), x @ w + b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [3, 12])
def test_multi_row_gemv(rows: int) -> None:
    """T*B rows (a spiking layer's stateless matmul): row blocks of up to 4 share a weight pass."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((50, 70)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    model = dense_onnx([w], [b], rows=rows)
    fast, table = build_vm(model, load_profile("x86-avx512"))
    assert [r["kernel"] for r in table] == ["gemv-packed-f32"]
    x = rng.standard_normal((rows, 50)).astype(np.float32)
    np.testing.assert_allclose(fast(x), x @ w + b, rtol=1e-4, atol=1e-4)


def test_int8_matmulinteger_gemv_is_exact() -> None:
    """Dynamic int8 (ONNX MatMulInteger): int8 packed weights, int32 accumulation, bit-exact vs generic; the two
    layers are one chain kernel."""
    rng = np.random.default_rng(5)
    ws = [(rng.standard_normal((a, c)) / np.sqrt(a)).astype(np.float32) for a, c in itertools.pairwise([64, 48, 10])]
    model = run(dense_onnx(ws, [np.zeros(48, np.float32), np.zeros(10, np.float32)], gemm=True),
                Config(mode="dynamic")).model
    prof = load_profile("x86-avx512")
    fast, table = build_vm(model, prof)
    generic, _ = build_vm(model, prof, substitute=False)
    assert [r["kernel"] for r in table] == ["gemv-chain-i8"]
    x = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_array_equal(fast(x), generic(x))
