"""The int8 GEMV on the CPU's dot products: the instructions in the built library per profile (VNNI
``vpdpbusd`` on x86-avx512, ``vpmaddubsw`` and no VNNI on x86-avx2, ``sdot`` on aarch64), exactness against
the generic lowering (MatMulInteger alone, whole dynamic-int8 layers fused into one kernel, dense and
grouped, and a chain of them fused into one kernel), and agreement with ONNX Runtime's int8 on real
Fashion-MNIST inputs."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from kernels.tvm import int8_isa
from kernels.tvm.testing import block_diagonal, build_vm, dense_onnx, with_kernels
from kernels.tvm.tir.block_sparse import pack_block_sparse_int8
from kernels.tvm.tir.int8_dot import exact_on, pack_int8
from targets.tvm.build import build_library
from tests.fixtures.disassembly import assert_instructions, built_library, function_bodies
from toolchain.core.onnx_io import ort_session
from toolchain.core.profile import load_profile
from toolchain.passes import PassContext
from toolchain.passes.int8 import Config, run

ORT_AGREEMENT = 0.99  # share of Fashion-MNIST test images with the same argmax as ONNX Runtime int8


def int8_mlp(dims: list[int], profile_id: str, seed: int = 0) -> onnx.ModelProto:
    """A dynamic-int8 MLP (Gemm layers, as torch exports them) quantized for ``profile_id``."""
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((a, c)) / np.sqrt(a)).astype(np.float32) for a, c in itertools.pairwise(dims)]
    bs: list[np.ndarray | None] = [(0.1 * rng.standard_normal(c)).astype(np.float32) for c in dims[1:]]
    ctx = PassContext(profile=load_profile(profile_id), target="tvm")
    return run(dense_onnx(ws, bs, gemm=True), Config(mode="dynamic"), ctx).model


def kernel_disassembly(lib: Path, objdump: str) -> dict[str, str]:
    """symbol -> its disassembly, for every int8 GEMV or chain kernel body (not the FFI wrappers), and ``"*"``
    -> the whole library's."""
    return function_bodies(lib, objdump, lambda sym: ("gemv_i8" in sym or "gemv_chain" in sym)
                           and not sym.startswith("__tvm_ffi"))


def build(model: onnx.ModelProto, profile_id: str, tmp_path: Path) -> tuple[Path, dict]:
    lib = tmp_path / f"{profile_id}.so"
    return lib, built_library(model, load_profile(profile_id), lib)


def test_profiles_pick_their_dot_product() -> None:
    assert [int8_isa(p.cpu.arch, p.cpu.int8_dot, p.cpu.vector_bits)
            for p in map(load_profile, ["x86-avx512", "x86-avx2", "rpi5", "phone-arm64"])] == \
        ["vnni", "avx2", "sdot", "sdot"]


def test_avx2_exactness_bound() -> None:
    ok = np.array([[63, -64], [64, -64], [-64, 63]], np.int8)  # pairs (k0, k1): +127 / -128 at most
    assert exact_on("avx2", ok)
    assert not exact_on("avx2", np.array([[100], [100]], np.int8))  # 255 * 200 saturates int16
    assert exact_on("avx2", np.array([[100], [0], [100]], np.int8))  # rows 0 and 2 are not a pair
    assert exact_on("vnni", np.array([[127], [127]], np.int8))


def test_pack_int8_layout() -> None:
    w = np.arange(6 * 20, dtype=np.int64).reshape(6, 20).astype(np.int8)
    p = pack_int8(w, 16, 8)  # K4 = 2 groups (k padded to 8), one 16-wide block, a tail of 4 padded to 8
    head = p[:2 * 16 * 4].reshape(2, 16, 4)
    assert head[1, 3, 1] == w[5, 3] and head[1, 3, 2] == 0  # k = 4 * 1 + 1; k = 6 is padding
    tail = p[2 * 16 * 4:].reshape(2, 8, 4)
    assert tail[0, 2, 3] == w[3, 18] and np.all(tail[:, 4:] == 0)


@pytest.mark.parametrize("profile_id,present,absent", [
    ("x86-avx512", [r"\bvpdpbusd\b"], []),
    ("x86-avx2", [r"\bvpmaddubsw\b", r"\bvpmaddwd\b"], [r"\bvpdpbusd\b", "zmm"]),  # no VNNI, no AVX-512 on a Haswell
])
def test_x86_int8_kernels_use_dot_products(profile_id: str, present: list[str], absent: list[str],
                                           tmp_path: Path) -> None:
    lib, meta = build(int8_mlp([97, 70, 10], profile_id), profile_id, tmp_path)
    assert [r["kernel"] for r in meta["kernels"]] == ["gemv-chain-i8"]  # the two int8 layers: one kernel
    funcs = kernel_disassembly(lib, "objdump")
    assert len(funcs) == 2, f"expected the int8 chain body, got {sorted(funcs)}"
    assert_instructions(funcs, present, absent)


@pytest.mark.parametrize("profile_id", ["rpi5", "phone-arm64"])
def test_aarch64_int8_kernels_use_sdot(profile_id: str, tmp_path: Path) -> None:
    lib, meta = build(int8_mlp([97, 70, 10], profile_id), profile_id, tmp_path)
    assert meta["elf_machine"] == "aarch64"
    assert [r["kernel"] for r in meta["kernels"]] == ["gemv-chain-i8"]
    funcs = kernel_disassembly(lib, "aarch64-linux-gnu-objdump")
    assert len(funcs) == 2, f"expected the int8 chain body, got {sorted(funcs)}"
    for name, asm in funcs.items():
        assert re.search(r"\bsdot\b", asm), f"sdot missing from {name}"


@pytest.mark.parametrize("profile_id", ["x86-avx512", "x86-avx2"])
def test_int8_dot_is_exact_vs_generic(profile_id: str) -> None:
    """MatMulInteger is integer arithmetic: the dot-product kernels match TVM's generic lowering bit for bit
    (odd K and N: padding in k groups and tails), per layer and with the layers chained into one kernel."""
    model = int8_mlp([97, 70, 33, 10], profile_id, seed=1)
    prof = load_profile(profile_id)
    chained, table = build_vm(model, prof)
    per_layer, ltable = build_vm(model, with_kernels(prof, gemv_chain_max_kb=0))
    generic, _ = build_vm(model, prof, substitute=False)
    # Each layer is one kernel (dynamic quantization, dot products and dequantization fused); chained, one.
    assert [r["kernel"] for r in ltable] == ["gemv-packed-i8"] * 3, ltable
    assert [r["kernel"] for r in table] == ["gemv-chain-i8"], table
    rng = np.random.default_rng(2)
    for _ in range(3):
        x = rng.standard_normal((1, 97)).astype(np.float32)
        np.testing.assert_array_equal(per_layer(x), generic(x))
        np.testing.assert_array_equal(chained(x), generic(x))


@pytest.mark.parametrize("profile_id", ["x86-avx512", "x86-avx2"])
def test_int8_matches_onnx_runtime_on_fashion_mnist(profile_id: str, fashion: object) -> None:
    """A small Fashion-MNIST classifier (random ReLU features + least-squares readout), int8 dynamic: TVM's
    logits on real test images agree with ONNX Runtime's int8 in argmax and within a small error."""
    rng = np.random.default_rng(0)
    xtr, ytr = fashion.x_train[:3000], fashion.y_train[:3000]  # type: ignore[attr-defined]
    w1 = (rng.standard_normal((784, 256)) / 28).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(256)).astype(np.float32)
    h = np.maximum(xtr @ w1 + b1, 0)
    w2 = np.linalg.lstsq(np.c_[h, np.ones(len(h))], np.eye(10)[ytr], rcond=None)[0].astype(np.float32)
    model = run(dense_onnx([w1, w2[:-1]], [b1, w2[-1]], gemm=True), Config(mode="dynamic"),
                PassContext(profile=load_profile(profile_id), target="tvm")).model
    fast, table = build_vm(model, load_profile(profile_id))
    assert [r["kernel"] for r in table] == ["gemv-chain-i8"]
    sess = ort_session(model, 1)
    xs = fashion.x_test[:500]  # type: ignore[attr-defined]
    ours = np.concatenate([fast(x[None]) for x in xs])
    ort = np.concatenate([sess.run(None, {"x": x[None]})[0] for x in xs])
    assert np.mean(ours.argmax(1) == ort.argmax(1)) >= ORT_AGREEMENT
    assert np.max(np.abs(ours - ort)) <= 0.05 * np.max(np.abs(ort))
    assert np.mean(ours.argmax(1) == fashion.y_test[:500]) > 0.7  # type: ignore[attr-defined]  # a real classifier


def grouped_int8_mlp(profile_id: str, interleave: bool, foreign: int, seed: int = 3) -> onnx.ModelProto:
    """A G2GNet-like int8 MLP 96-256-256-10: block-diagonal hidden layers of 8 groups (``interleave``: the
    mixer grouping on the second, output j in group j % 8; ``foreign``: inputs from other groups per output
    group, at scattered rows)."""
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((96, 256)) / 10).astype(np.float32)]
    for layer in range(2):
        w = block_diagonal(256, 256, 8, seed=seed + layer)
        for g in range(8):
            rows = rng.choice(256, foreign, replace=False)
            w[rows, g * 32:(g + 1) * 32] = rng.standard_normal((foreign, 32)).astype(np.float32) / 4
        if interleave and layer == 1:
            w = w[:, np.argsort(np.arange(256) % 8, kind="stable")]
        ws.append(w)
    ws.append((rng.standard_normal((256, 10)) / 10).astype(np.float32))
    bs: list[np.ndarray | None] = [(0.1 * rng.standard_normal(w.shape[1])).astype(np.float32) for w in ws]
    model = dense_onnx(ws, bs, gemm=True)
    return run(model, Config(mode="dynamic"), PassContext(profile=load_profile(profile_id), target="tvm")).model


@pytest.mark.parametrize("profile_id", ["x86-avx512", "x86-avx2"])
@pytest.mark.parametrize("interleave,foreign", [(False, 0), (True, 0), (False, 5)])
def test_grouped_int8_is_exact_vs_generic(profile_id: str, interleave: bool, foreign: int) -> None:
    """Block-diagonal int8 layers run as the grouped int8 kernel (windows of 4 inputs, regrouped outputs
    for the mixer grouping, gathered rows for scattered foreign inputs), as the generic lowering computes
    them (the fp32 dequantization after them may contract to FMAs: last-bit differences)."""
    model = grouped_int8_mlp(profile_id, interleave, foreign)
    prof = load_profile(profile_id)
    fast, table = build_vm(model, prof)
    generic, _ = build_vm(model, prof, substitute=False)
    kinds = [r["kernel"] for r in table]
    assert kinds == ["gemv-packed-i8", "grouped-gemv-i8", "grouped-gemv-i8", "gemv-packed-i8"], table
    rng = np.random.default_rng(4)
    for _ in range(3):
        x = rng.standard_normal((1, 96)).astype(np.float32)
        np.testing.assert_allclose(fast(x), generic(x), rtol=1e-6, atol=1e-6)


def matmul_integer(w: np.ndarray, rows: int = 1) -> onnx.ModelProto:
    """x[rows, K] fp32 -> DynamicQuantizeLinear -> MatMulInteger by the int8 constant ``w``: int32 out."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "W", "xz"], ["y"])]
    g = helper.make_graph(nodes, "mmi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, w.shape[1]])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("profile_id", ["x86-avx512", "x86-avx2"])
@pytest.mark.parametrize("layout", ["dense", "groups", "interleaved", "scattered"])
def test_matmul_integer_is_bit_exact(profile_id: str, layout: str) -> None:
    """MatMulInteger's int32 result, dense and grouped kernels, 1 and 3 rows: equal to the generic lowering's."""
    rng = np.random.default_rng(6)
    w = rng.integers(-64, 64, (200, 256)).astype(np.int8)  # reduced range: exact on AVX2 too
    if layout != "dense":
        w[block_diagonal(200, 256, 8) == 0] = 0
    if layout == "interleaved":
        w = w[:, np.argsort(np.arange(256) % 8, kind="stable")]
    if layout == "scattered":
        w[rng.choice(200, 6, replace=False)] = rng.integers(-64, 64, (6, 256))
    for rows in (1, 3):
        model = matmul_integer(w, rows)
        fast, table = build_vm(model, load_profile(profile_id))
        generic, _ = build_vm(model, load_profile(profile_id), substitute=False)
        assert [r["kernel"] for r in table if r["kernel"]] == \
            ["gemv-packed-i8" if layout == "dense" else "grouped-gemv-i8"], table
        x = rng.standard_normal((rows, 200)).astype(np.float32)
        out = fast(x)
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, generic(x))


def test_grouped_int8_packing_streams_only_kept_rows() -> None:
    w = np.zeros((64, 64), np.int8)
    w[:16, :32] = 1
    w[40:56, 32:] = -1
    w[7, 40] = 3  # one scattered row in the second block
    bq = pack_block_sparse_int8(w, 32)
    assert not bq.gather and bq.gptr.tolist() == [0, 4, 9]  # 4 windows; 4 + one for row 7
    assert bq.density == 36 / 128
    assert bq.colsum.tolist() == w.astype(np.int32).sum(0).tolist()


def test_avx2_full_range_weights_do_not_saturate() -> None:
    """Weights quantized without reduced range (for a VNNI CPU) could saturate vpmaddubsw's int16 pairs on
    x86-avx2: that layer falls back to the sign-extending int32 GEMV and stays exact."""
    rng = np.random.default_rng(7)
    w = rng.integers(-128, 128, (64, 32)).astype(np.int8)
    w[0, :] = 127
    w[1, :] = 127  # a pair of k whose products reach 255 * 254 > 2**15
    assert not exact_on("avx2", w)
    model = matmul_integer(w)
    prof = load_profile("x86-avx2")
    fast, table = build_vm(model, prof)
    generic, _ = build_vm(model, prof, substitute=False)
    assert [r["kernel"] for r in table if r["kernel"]] == ["gemv-packed-i8"]
    x = np.abs(rng.standard_normal((1, 64))).astype(np.float32)  # large uint8 activations on the saturating pair
    x[0, :2] = 10.0
    np.testing.assert_array_equal(fast(x), generic(x))
    lib_asm = kernel_disassembly_of(model, "x86-avx2")
    assert "vpmaddubsw" not in lib_asm and "vpdpbusd" not in lib_asm


def kernel_disassembly_of(model: onnx.ModelProto, profile_id: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        lib = Path(td) / "m.so"
        build_library(model, load_profile(profile_id), lib)
        return kernel_disassembly(lib, "objdump")["*"]
