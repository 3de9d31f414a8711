"""bf16 on TVM per family structure: the bf16 pass (weight-only form on tvm) then the profile's pipeline.

Each build must run, keep its hand-written kernels and agree with the fp32 build of the same model within
BF16_TOL of the output's scale (bf16 keeps 8 significant bits: each weight moves by at most 2^-9 of
itself, and a K-long dot product of such errors stays around 1 %); dense layers store their weights as
bf16 (``gemv-packed-bf16w``), so a model whose bytes are in dense layers shrinks to about half."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from kernels.tvm.testing import block_diagonal, build_vm, dense_onnx, with_kernels
from kernels.tvm.tir.bf16 import to_bf16_bits
from targets.tvm.frontend import import_onnx
from targets.tvm.pipeline import pipeline
from targets.tvm.tuning import auto_trials
from toolchain.core.profile import load_profile
from toolchain.core.tvm_abi import tensor_nbytes
from toolchain.export import torch_to_onnx
from toolchain.passes import PassContext
from toolchain.passes.bf16 import Config as Bf16Config
from toolchain.passes.bf16 import run as bf16_pass
from toolchain.zoo import kan_bases as kb
from toolchain.zoo.convkan import ConvKANNet
from toolchain.zoo.spiking import SpikingMLP

PROFILE = load_profile("x86-avx512")
BF16_TOL = 2e-2  # max |bf16 - fp32| over max |fp32|


def to_bf16(model: onnx.ModelProto, form: str = "auto") -> onnx.ModelProto:
    res = bf16_pass(model, Bf16Config(form=form), PassContext(target="tvm"))
    onnx.checker.check_model(res.model, full_check=True)
    return res.model


def round_bf16(w: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), as float32."""
    bits = w.astype(np.float32).view(np.uint32)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def constant_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every constant the lowered module holds (what the library carries as weights), each once: the
    weights entry points (targets/tvm/weights_as_inputs.py) use ``main``'s constants, one pool in the library."""
    import tvm
    from tvm import relax

    mod = import_onnx(model)
    for _name, step in pipeline(PROFILE):
        mod = step(mod)
    seen: list[Any] = []

    def visit(e: Any) -> None:
        v = getattr(e, "value", None) if isinstance(e, tvm.ir.expr.GenericConst) else None
        if hasattr(v, "shape") and hasattr(v, "dtype") and not any(e.same_as(s) for s in seen):
            seen.append(e)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return sum(tensor_nbytes(c.value) for c in seen)


def agree(fp32: object, bf16: object, inputs: list[np.ndarray]) -> float:
    """max |bf16 - fp32| / max |fp32| over ``inputs``."""
    err, scale = 0.0, 0.0
    for x in inputs:
        a, b = fp32(x), bf16(x)  # type: ignore[operator]
        assert np.all(np.isfinite(b))
        err, scale = max(err, float(np.abs(a - b).max())), max(scale, float(np.abs(a).max()))
    assert scale > 0
    return err / scale


def kernels_of(table: list[dict]) -> list[str]:
    return [r["kernel"] for r in table if r["kernel"]]


def test_pack_pairs_puts_column_j_low_and_j_plus_half_high() -> None:
    from kernels.tvm.tir.gemv import GemvParams, pack_weight
    from kernels.tvm.tir.gemv_bf16 import pack_pairs

    w = round_bf16(np.random.default_rng(9).standard_normal((3, 70)).astype(np.float32))  # 64 + tail of 6 (-> 8)
    p = GemvParams(m=1, k=3, n=70, block_n=64, unroll=1)
    bits = to_bf16_bits(pack_weight(w, 64))
    assert bits is not None
    words = pack_pairs(bits, p)
    assert words.dtype == np.uint32 and words.size * 2 == p.packed_size

    def col(word: np.ndarray, high: bool) -> np.ndarray:
        return ((word >> 16 << 16) if high else (word << 16)).astype(np.uint32).view(np.float32)

    full = words[: 3 * 32].reshape(3, 32)
    np.testing.assert_array_equal(col(full, False), w[:, :32])
    np.testing.assert_array_equal(col(full, True), w[:, 32:64])
    tail = words[3 * 32:].reshape(3, 4)  # tail width 8: columns 64..67 low, 68..71 high (70, 71 are padding)
    np.testing.assert_array_equal(col(tail, False), w[:, 64:68])
    np.testing.assert_array_equal(col(tail, True)[:, :2], w[:, 68:70])
    assert not col(tail, True)[:, 2:].any()


@pytest.mark.parametrize(("n", "rows"), [(37, 1), (100, 4)])
def test_bf16_gemv_equals_fp32_gemv_on_the_rounded_weights(n: int, rows: int) -> None:
    """The bf16-weight GEMV reads exactly the bf16 weights and accumulates in fp32 (tail columns, row blocks)."""
    rng = np.random.default_rng(0)
    w = [round_bf16(rng.standard_normal((200, n)).astype(np.float32) / 14), round_bf16(
        rng.standard_normal((n, 10)).astype(np.float32) / 8)]
    b = [rng.standard_normal(n).astype(np.float32), None]
    model = dense_onnx(w, b, rows=rows)
    run, table = build_vm(model, PROFILE)
    assert kernels_of(table) == ["gemv-chain-bf16w"]  # a tiny MLP: one chain kernel
    single, stable = build_vm(model, with_kernels(PROFILE, gemv_chain_max_kb=0))
    assert kernels_of(stable) == ["gemv-packed-bf16w", "gemv-packed-bf16w"]
    x = rng.standard_normal((rows, 200)).astype(np.float32)
    want = np.maximum(x @ w[0] + b[0], 0) @ w[1]
    np.testing.assert_allclose(run(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(single(x), want, rtol=1e-5, atol=1e-5)


def test_weights_that_are_not_bf16_stay_fp32() -> None:
    """Storing as bf16 is lossless only for bf16-exact weights: any other fp32 weight keeps the fp32 GEMV."""
    w = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
    assert to_bf16_bits(w) is None and to_bf16_bits(round_bf16(w)) is not None
    _, table = build_vm(dense_onnx([w], [None]), PROFILE)
    assert kernels_of(table) == ["gemv-packed-f32"]


def test_dense_bf16_build_agrees_and_halves_the_weight_bytes() -> None:
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal((784, 512)).astype(np.float32) / 28,
          rng.standard_normal((512, 10)).astype(np.float32) / 22]
    model = dense_onnx(ws, [rng.standard_normal(512).astype(np.float32), None])
    half = to_bf16(model)
    fp32, _ = build_vm(model, PROFILE)
    bf16, table = build_vm(half, PROFILE)
    assert kernels_of(table) == ["gemv-chain-bf16w"]  # 0.8 MB of bf16 weights: within the chain limit
    xs = [rng.standard_normal((1, 784)).astype(np.float32) for _ in range(8)]
    assert agree(fp32, bf16, xs) < BF16_TOL
    ratio = constant_bytes(half) / constant_bytes(model)
    assert 0.45 < ratio < 0.55, ratio


@pytest.mark.parametrize("kind", ["rbf", "bspline", "cheby"])
def test_kan_layer_bf16_build(kind: str) -> None:
    """The fused KAN kernel still applies (the graph stays fp32), its coefficients stored as bf16, and the
    base linear layers of rbf / bspline run in the bf16 GEMV: the weights take about half the bytes."""
    torch.manual_seed(0)
    cls = {"rbf": kb.FastKANLayer, "bspline": kb.BSplineKANLayer, "cheby": kb.ChebyKANLayer}[kind]
    layer = torch.nn.Sequential(cls(96, 32), cls(32, 10)).eval()
    model = torch_to_onnx(layer, (torch.randn(1, 96),), dynamic_batch=False)
    half = to_bf16(model)
    fp32, ftable = build_vm(model, PROFILE)
    bf16, table = build_vm(half, PROFILE)
    assert kernels_of(ftable).count("kan-fused-f32") == 2
    names = kernels_of(table)
    assert names.count("kan-fused-bf16w") == 2 and "kan-fused-f32" not in names, names
    assert not any(k.startswith("gemv-packed-f32") for k in names), names
    rng = np.random.default_rng(3)
    assert agree(fp32, bf16, [(rng.standard_normal((1, 96)) * s).astype(np.float32) for s in (0.5, 1.0, 2.0)]) \
        < BF16_TOL
    ratio = constant_bytes(half) / constant_bytes(model)
    assert 0.45 < ratio < 0.6, ratio


def test_kan_compute_form_builds_with_layernorm_kept_fp32() -> None:
    """The compute form (bf16 activations) used to stop in TVM's layer_norm (fp32 / fp16 only)."""
    torch.manual_seed(0)
    model = torch_to_onnx(kb.FastKANLayer(64, 10).eval(), (torch.randn(1, 64),), dynamic_batch=False)
    half = to_bf16(model, form="compute")
    norms = [n for n in half.graph.node if n.op_type == "LayerNormalization"]
    assert norms, "the FastKAN export has a LayerNormalization"
    fp32, _ = build_vm(model, PROFILE)
    bf16, _ = build_vm(half, PROFILE)
    rng = np.random.default_rng(4)
    assert agree(fp32, bf16, [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(3)]) < 5e-2


def _spiking(steps: int, weight_grid: float | None) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = SpikingMLP(hidden=[64], steps=steps, beta=0.875, threshold=1.0, reset="subtract",
                     surrogate="fast_sigmoid").eval()
    with torch.no_grad():  # enough current that neurons spike
        for fc in net.fcs:
            fc.weight.mul_(4.0)
            if weight_grid is not None:  # on a grid bf16 holds exactly (|w| < 1, 8 significant bits)
                fc.weight.copy_(torch.round(fc.weight / weight_grid) * weight_grid)
                fc.bias.copy_(torch.round(fc.bias / weight_grid) * weight_grid)
    return torch_to_onnx(net, (torch.rand(1, 784),), dynamic_batch=False)


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.random((1, 784)).astype(np.float32) for _ in range(n)]


def test_lif_bf16_exact_weights_give_identical_spikes() -> None:
    """T=16 (GEMV + fused recurrence): with weights bf16 already holds, the bf16 build is the fp32 one."""
    model = _spiking(16, 2.0**-8)
    prof = with_kernels(PROFILE, lif_layer_max_rows=8)  # above it: GEMV + fused recurrence
    fp32, _ = build_vm(model, prof)
    bf16, table = build_vm(to_bf16(model), prof)
    names = kernels_of(table)
    assert names.count("gemv-packed-bf16w") == 2 and names.count("lif-fused-f32") == 2, names
    total = 0.0
    for x in _images(4):
        np.testing.assert_array_equal(bf16(x), fp32(x))
        total += float(fp32(x).sum())
    assert total > 0  # spikes reached the output


@pytest.mark.parametrize("steps", [8, 16])
def test_lif_bf16_spike_counts_agree(steps: int) -> None:
    """Rounded weights move a membrane by < 1 %: spike counts stay within one of fp32's."""
    model = _spiking(steps, None)
    fp32, _ = build_vm(model, PROFILE)
    half = to_bf16(model)
    bf16, table = build_vm(half, PROFILE)
    names = kernels_of(table)
    if steps <= PROFILE.kernels.lif_layer_max_rows:  # matmul + recurrence in one kernel, its weights bf16
        assert names.count("lif-layer-bf16w") == 2, names
    else:  # the bf16 GEMV + the fused recurrence
        assert names.count("gemv-packed-bf16w") == 2 and names.count("lif-fused-f32") == 2, names
    assert 0.45 < constant_bytes(half) / constant_bytes(model) < 0.6
    diffs = np.concatenate([np.abs(bf16(x) - fp32(x)).ravel() for x in _images(6)])
    assert diffs.max() <= 1 and diffs.mean() < 0.1, (diffs.max(), diffs.mean())


def test_grouped_layer_bf16_build() -> None:
    rng = np.random.default_rng(6)
    w = block_diagonal(256, 256, 8)
    model = dense_onnx([w, rng.standard_normal((256, 10)).astype(np.float32) / 16],
                       [rng.standard_normal(256).astype(np.float32), None])
    fp32, _ = build_vm(model, PROFILE)
    bf16, table = build_vm(to_bf16(model), PROFILE)
    assert kernels_of(table) == ["grouped-gemv-f32", "gemv-packed-bf16w"]
    assert agree(fp32, bf16, [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(4)]) < BF16_TOL


def test_convkan_bf16_build() -> None:
    torch.manual_seed(0)
    net = ConvKANNet((4, 8), (4, 3)).eval()
    model = torch_to_onnx(net, (torch.rand(1, 1, 28, 28),), dynamic_batch=False)
    fp32, _ = build_vm(model, PROFILE)
    bf16, table = build_vm(to_bf16(model), PROFILE)
    assert "gemv-packed-bf16w" in kernels_of(table)  # the head; the convolutions keep fp32 weights
    rng = np.random.default_rng(7)
    assert agree(fp32, bf16, [rng.random((1, 1, 28, 28)).astype(np.float32) for _ in range(3)]) < BF16_TOL


def test_auto_tuning_plans_no_trials_for_a_bf16_mlp(tmp_path: Path) -> None:
    """mlp-1m's shape (784-1024-512-256-10): the bf16 build's dense layers are hand-written kernels, so
    "auto" tuning finds nothing heavy to tune (the compute form's naive bf16 matmuls started 96 trials)."""
    rng = np.random.default_rng(8)
    dims = (784, 1024, 512, 256, 10)
    ws = [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32) for a, b in itertools.pairwise(dims)]
    model = dense_onnx(ws, [rng.standard_normal(w.shape[1]).astype(np.float32) for w in ws])
    path = tmp_path / "bf16.onnx"
    onnx.save(to_bf16(model), path)
    assert auto_trials(path, PROFILE) == (0, [])
    onnx.save(to_bf16(model, form="compute"), path)
    trials, heavy = auto_trials(path, PROFILE)
    assert trials > 0 and heavy  # what the weight-only form avoids
