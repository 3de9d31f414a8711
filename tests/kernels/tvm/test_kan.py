"""Fused KAN kernels on the zoo's three KAN layer types (exported by torch): fp32 vs the generic lowering;
after the int8 pass, one int8 kernel per layer that agrees with ONNX Runtime's int8 on real Fashion-MNIST
inputs and multiplies on the profile's int8 dot products (vpdpbusd, vpmaddubsw, sdot)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kernels.tvm.testing import build_vm, substitute, with_kernels
from kernels.tvm.tir import kan
from kernels.tvm.tir._elementwise import BINARY, CONST, INPUT, SLICE, UNARY, Node
from tests.fixtures.disassembly import assert_instructions, built_library, function_bodies, objdump_for
from toolchain.core.onnx_io import ort_session
from toolchain.core.profile import load_profile
from toolchain.export import torch_to_onnx
from toolchain.passes import PassContext
from toolchain.passes.int8 import Config, run
from toolchain.zoo import kan_bases as kb
from toolchain.zoo.kan import KANNet


def _export(layer: object, n: int) -> object:
    torch.manual_seed(0)
    return torch_to_onnx(layer, (torch.randn(1, n),), dynamic_batch=False)


@pytest.mark.parametrize("kind", ["bspline", "rbf", "cheby"])
@pytest.mark.parametrize("profile_id", ["x86-avx512", "x86-avx2"])
def test_fused_kan_matches_generic(kind: str, profile_id: str) -> None:
    torch.manual_seed(1)
    n, out = 37, 12  # n not a multiple of the lanes: exercises the tail chunk
    layer = {"bspline": kb.BSplineKANLayer, "rbf": kb.FastKANLayer, "cheby": kb.ChebyKANLayer}[kind](n, out)
    with torch.no_grad():  # spline weights large enough that a wrong basis would show
        layer.spline_weight.mul_(10)
    model = _export(layer.eval(), n)
    prof = load_profile(profile_id)
    fused, table = build_vm(model, prof)
    generic, gtable = build_vm(model, prof, substitute=False)
    assert "kan-fused-f32" in [r["kernel"] for r in table]
    assert all(r["origin"] == "generic" for r in gtable)
    rng = np.random.default_rng(2)
    for scale in (0.5, 2.0):  # inside and partly outside the spline grid
        x = (rng.standard_normal((1, n)) * scale).astype(np.float32)
        ref = layer(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(fused(x), generic(x), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(fused(x), ref, rtol=1e-4, atol=1e-4)


def test_fused_kan_off_in_profile() -> None:
    model = _export(kb.ChebyKANLayer(8, 4).eval(), 8)
    _, table = build_vm(model, with_kernels(load_profile("x86-avx512"), use_fused_kan=False))
    assert "kan-fused-f32" not in [r["kernel"] for r in table]


# --- int8: the int8 pass's dynamic-int8 KAN layers as one kernel each, on the CPU's int8 dot products ---

ORT_AGREEMENT = 0.99  # share of Fashion-MNIST test images with the same argmax as ONNX Runtime's int8


@pytest.fixture(scope="module")
def trained_kan_onnx(fashion: object) -> Callable[[str], onnx.ModelProto]:
    """kind -> the fp32 ONNX of a KAN 784-16-10 of that kind trained briefly on 2000 Fashion-MNIST images (a
    real classifier, so the agreement below is on real activations, not on noise); trained once per kind."""
    made: dict[str, onnx.ModelProto] = {}

    def get(kind: str) -> onnx.ModelProto:
        if kind not in made:
            torch.manual_seed(0)
            model = KANNet(kind, [784, 16, 10], 8)
            xs = torch.from_numpy(fashion.x_train[:2000])  # type: ignore[attr-defined]
            ys = torch.from_numpy(fashion.y_train[:2000])  # type: ignore[attr-defined]
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            for i in range(0, 2000, 100):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xs[i:i + 100]), ys[i:i + 100]).backward()
                opt.step()
            made[kind] = _export(model.eval(), 784)
        return made[kind]

    return get


def _int8(model: onnx.ModelProto, profile_id: str) -> onnx.ModelProto:
    return run(model, Config(mode="dynamic"), PassContext(profile=load_profile(profile_id), target="tvm")).model


@pytest.mark.parametrize("profile_id,kind", [
    ("x86-avx512", "rbf"), ("x86-avx512", "cheby"), ("x86-avx2", "rbf"),
    # B-spline training and export take ~10 s each on a busy machine: test_int8_kan_layer_matches_onnx_runtime
    # covers its basis in the default tier
    pytest.param("x86-avx512", "bspline", marks=pytest.mark.slow),
    pytest.param("x86-avx2", "bspline", marks=pytest.mark.slow),
    pytest.param("x86-avx2", "cheby", marks=pytest.mark.slow),
])
def test_int8_kan_agrees_with_onnx_runtime(kind: str, profile_id: str, fashion: object,
                                           trained_kan_onnx: Callable[[str], onnx.ModelProto]) -> None:
    """The int8 pass's KAN (dynamic int8 contraction and SiLU base branch): both layers are one fused int8
    kernel call (each layer's LayerNorm, basis, quantization, dot products, base branch; the first layer's output
    on the stack), and its logits on real test images agree with ONNX Runtime running the same int8 ONNX."""
    model = _int8(trained_kan_onnx(kind), profile_id)
    prof = load_profile(profile_id)
    fast, table = build_vm(model, prof)
    rows = [r for r in table if r["kernel"]]
    assert [r["kernel"] for r in rows] == ["kan-fused-i8"], table
    assert [r["layers"] for r in substitute(model, prof)[1] if r["kernel"]] == [2]
    sess = ort_session(model, 1)
    name = sess.get_inputs()[0].name
    xs = fashion.x_test[:300]  # type: ignore[attr-defined]
    ours = np.concatenate([fast(x[None]) for x in xs])
    ref = np.concatenate([sess.run(None, {name: x[None]})[0] for x in xs])
    assert np.mean(ours.argmax(1) == ref.argmax(1)) >= ORT_AGREEMENT
    assert np.max(np.abs(ours - ref)) <= 0.02 * np.max(np.abs(ref))
    assert np.mean(ours.argmax(1) == fashion.y_test[:300]) > 0.6  # type: ignore[attr-defined]  # a real classifier


@pytest.mark.parametrize("kind", ["bspline", "rbf", "cheby"])
def test_int8_kan_layer_matches_onnx_runtime(kind: str) -> None:
    """One int8 KAN layer (n not a multiple of the lanes: a tail chunk; 12 outputs: a tail block), spline
    weights large enough that a wrong basis would show: close to ONNX Runtime on the same int8 ONNX. The closed-form
    bases (B-splines, Gaussians) are streamed chunk by chunk (``kan.emit_streamed_layer``), the others not."""
    torch.manual_seed(1)
    n, out = 37, 12
    layer = {"bspline": kb.BSplineKANLayer, "rbf": kb.FastKANLayer, "cheby": kb.ChebyKANLayer}[kind](n, out)
    with torch.no_grad():
        layer.spline_weight.mul_(10)
    model = _int8(_export(layer.eval(), n), "x86-avx512")
    fast, table = build_vm(model, load_profile("x86-avx512"))
    assert [r["kernel"] for r in table if r["kernel"]] == ["kan-fused-i8"], table
    report = [r for r in substitute(model, load_profile("x86-avx512"))[1] if r["kernel"] == "kan-fused-i8"]
    assert [r["streamed"] for r in report] == [[kind != "cheby"]], report
    sess = ort_session(model, 1)
    rng = np.random.default_rng(2)
    for scale in (0.5, 2.0, 0.0):  # inside and partly outside the spline grid; 0: one feature far outside
        x = (rng.standard_normal((1, n)) * (scale or 0.3)).astype(np.float32)
        if not scale:  # FastKAN: the normalized feature about 6, Gaussians of the far centers below FLT_MIN
            x[0, 3] = 40.0
        ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(fast(x), ref, rtol=0, atol=0.01 * np.max(np.abs(ref)))
        # the kernel flushes denormals to 0 while it streams (x86 MXCSR FTZ / DAZ) and leaves them as it found them
        assert np.float32(1e-39) * np.float32(1.5) > 0


@pytest.mark.parametrize("n,lanes", [(37, 16), (32, 16), (13, 4), (5, 8)])
def test_chunk_major_rows(n: int, lanes: int) -> None:
    """The streamed kernel's weight rows: per chunk of ``lanes`` features, per basis, the chunk's features (the last
    chunk's padded to whole words with zero rows); the values laid out the same way give the same contraction."""
    k, out = 3, 5
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (n * k, out)).astype(np.int8)
    v = rng.integers(0, 256, (n, k))  # v[i, j]: basis j of feature i, the model's row order i*K + j
    rows = kan.chunk_major(w, n, k, lanes)
    chunks = [(c0, min(lanes, n - c0)) for c0 in range(0, n, lanes)]
    assert rows.shape == (k * sum(-(-wc // 4) * 4 for _, wc in chunks), out)
    vals = np.concatenate([np.pad(v[c0:c0 + wc].T, ((0, 0), (0, -(-wc // 4) * 4 - wc)), constant_values=255).ravel()
                           for c0, wc in chunks])  # the padding lanes hold anything: their rows are zero
    np.testing.assert_array_equal(vals @ rows.astype(np.int64), v.ravel() @ w.astype(np.int64))


def _kan_i8_disassembly(model: onnx.ModelProto, profile_id: str, tmp_path: Path) -> dict[str, str]:
    """symbol -> disassembly of every fused int8 KAN kernel body in the library built for ``profile_id``,
    and ``"*"`` -> the whole library's."""
    prof = load_profile(profile_id)
    lib = tmp_path / f"{profile_id}.so"
    meta = built_library(model, prof, lib)
    assert [r["kernel"] for r in meta["kernels"] if r.get("kernel")] == ["kan-fused-i8"], meta["kernels"]
    return function_bodies(lib, objdump_for(prof), lambda sym: "kan_i8" in sym and not sym.startswith("__tvm_ffi"))


@pytest.mark.parametrize("profile_id,present,absent", [
    ("x86-avx512", [r"\bvpdpbusd\b"], []),
    ("x86-avx2", [r"\bvpmaddubsw\b", r"\bvpmaddwd\b"], [r"\bvpdpbusd\b", r"zmm"]),  # a Haswell: no VNNI, no AVX-512
    ("rpi5", [r"\bsdot\b"], []),
    ("phone-arm64", [r"\bsdot\b"], []),
])
def test_int8_kan_uses_dot_products(profile_id: str, present: list[str], absent: list[str], tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = _int8(_export(KANNet("rbf", [37, 12, 10], 8).eval(), 37), profile_id)
    funcs = _kan_i8_disassembly(model, profile_id, tmp_path)
    assert len(funcs) == 2, f"expected the fused int8 KAN body (both layers), got {sorted(funcs)}"
    assert_instructions(funcs, present, absent)


def _cox_de_boor_graph(knots: np.ndarray, order: int) -> tuple[kan.BasisGraph, int]:
    """efficient-kan's Cox-de Boor recursion (``kb.BSplineBasis.forward``) as a basis graph, written out by hand."""
    g = kan.BasisGraph()

    def add(node: Node) -> int:
        g.nodes.append(node)
        return len(g.nodes) - 1

    def const(v: np.ndarray) -> int:
        return add(Node(CONST, len(v), values=tuple(float(c) for c in v)))

    def binary(op: str, a: int, b: int, w: int) -> int:
        return add(Node(BINARY, w, op, (a, b)))

    z = add(Node(INPUT))
    w = len(knots) - 1
    bases = binary("logical_and", binary("greater_equal", z, const(knots[:-1]), w),
                   binary("less", z, const(knots[1:]), w), w)
    for j in range(1, order + 1):
        w -= 1
        left = binary("divide", binary("subtract", z, const(knots[: -(j + 1)]), w),
                      const(knots[j:-1] - knots[: -(j + 1)]), w)
        right = binary("divide", binary("subtract", const(knots[j + 1:]), z, w),
                       const(knots[j + 1:] - knots[1:-j]), w)
        lo, hi = add(Node(SLICE, w, args=(bases,), start=0)), add(Node(SLICE, w, args=(bases,), start=1))
        bases = binary("add", binary("multiply", left, lo, w), binary("multiply", right, hi, w), w)
    g.output = bases
    return g, w


@pytest.mark.parametrize("grid,order", [(5, 3), (7, 2), (4, 1)])
def test_uniform_bspline_closed_form(grid: int, order: int) -> None:
    """The Cox-de Boor graph of efficient-kan's cubic B-splines is recognised as uniform B-splines (the int8
    kernel then evaluates the closed form per interval), and that form agrees with the torch basis inside,
    outside and exactly on the grid; a Gaussian RBF graph is not taken for one."""
    basis = kb.BSplineBasis(grid, order)
    knots = basis.grid.numpy()
    g, k = _cox_de_boor_graph(knots, order)
    sp = kan.uniform_bspline(g, k)
    assert sp is not None and sp.degree == order
    assert abs(sp.t0 - knots[0]) < 1e-6 and abs(sp.h - (knots[1] - knots[0])) < 1e-6
    z = np.concatenate([np.linspace(-3, 3, 2001), knots]).astype(np.float32)
    ref = basis(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(kan.evaluate_basis(g, k, z), ref, atol=1e-6)
    np.testing.assert_allclose(sp.values(z, k), ref, atol=2e-6)
    assert kan.uniform_bspline(_rbf_graph(), 8) is None
    assert kan.gaussian_rbf(g, k) is None


def _rbf_graph() -> kan.BasisGraph:
    """FastKAN's ``exp(-(((z - c) * a)^2))`` over 8 centers in [-2, 2] (``kb.RBFBasis``) as a basis graph."""
    centers = kb.RBFBasis(8).centers.numpy()
    return kan.BasisGraph([Node(INPUT), Node(CONST, 8, values=tuple(map(float, centers))),
                           Node(BINARY, 8, "subtract", (0, 1)), Node(CONST, values=(1.75,)),
                           Node(BINARY, 8, "multiply", (2, 3)), Node(BINARY, 8, "multiply", (4, 4)),
                           Node(UNARY, 8, "negative", (5,)), Node(UNARY, 8, "exp", (6,))], output=7)


def test_gaussian_rbf_ratio_form() -> None:
    """FastKAN's Gaussian RBF graph is recognised (the int8 kernel then takes 3 exps per feature, the rest by the
    ratio of neighbours), and that form agrees with the torch basis near the centers and stays finite and
    negligible far outside them (no overflow of the ratio, no NaN)."""
    basis = kb.RBFBasis(8)
    rbf = kan.gaussian_rbf(_rbf_graph(), 8)
    assert rbf is not None and abs(rbf.a - 1.75) < 1e-5
    z = np.concatenate([np.linspace(-6, 6, 4001), basis.centers.numpy()]).astype(np.float32)
    np.testing.assert_allclose(rbf.values(z, 8), basis(torch.from_numpy(z)).numpy(), rtol=0, atol=1e-5)
    far = rbf.values(np.asarray([-1e4, -40, 40, 1e4], np.float32), 8)
    assert np.all(np.isfinite(far)) and np.max(far) < 1e-12
