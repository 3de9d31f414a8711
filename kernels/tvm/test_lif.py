"""Fused LIF recurrence vs the generic lowering and ONNX Runtime on the zoo's SpikingMLP (unrolled T)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.tvm.harness import build_vm, with_kernels
from toolchain.profile import load_profile

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_fused_lif_matches_generic_and_ort(reset: str) -> None:
    from toolchain.export import run_ort, torch_to_onnx
    from toolchain.zoo.spiking import SpikingMLP

    torch.manual_seed(0)
    net = SpikingMLP(hidden=[37], steps=8, beta=0.875, threshold=1.0, reset=reset, surrogate="fast_sigmoid").eval()
    with torch.no_grad():  # enough current that neurons actually spike
        for fc in net.fcs:
            fc.weight.mul_(4.0)
    model = torch_to_onnx(net, (torch.rand(1, 784),), dynamic_batch=False)
    prof = load_profile("x86-avx512")
    fused, table = build_vm(model, prof)
    generic, _ = build_vm(model, with_kernels(prof, use_fused_lif=False))
    assert [r["kernel"] for r in table].count("lif-fused-f32") == 2
    rng = np.random.default_rng(1)
    total = 0.0
    for _ in range(3):
        x = rng.random((1, 784)).astype(np.float32)
        want = run_ort(model, [{model.graph.input[0].name: x}])[0][0]
        np.testing.assert_array_equal(fused(x), generic(x))
        np.testing.assert_array_equal(fused(x), want)
        total += float(want.sum())
    assert total > 0  # spikes reached the output: the comparison saw real recurrences


def test_fused_lif_off_in_profile() -> None:
    from toolchain.export import torch_to_onnx
    from toolchain.zoo.spiking import SpikingMLP

    net = SpikingMLP(hidden=[8], steps=4, beta=0.9, threshold=1.0, reset="zero", surrogate="fast_sigmoid").eval()
    model = torch_to_onnx(net, (torch.rand(1, 784),), dynamic_batch=False)
    _, table = build_vm(model, with_kernels(load_profile("x86-avx512"), use_fused_lif=False))
    assert "lif-fused-f32" not in [r["kernel"] for r in table]
