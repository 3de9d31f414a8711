"""Fused KAN kernel vs the generic lowering on the zoo's three KAN layer types (exported by torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.tvm.testing import build_vm, with_kernels
from toolchain.core.profile import load_profile
from toolchain.export import torch_to_onnx
from toolchain.zoo import kan_bases as kb


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
