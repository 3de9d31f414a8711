"""Fused LIF kernels vs the generic lowering and ONNX Runtime: the zoo's SpikingMLP (unrolled T), whose
layers become one event-driven kernel each (matmul + recurrence), and a bare recurrence (current as
the graph input), which keeps the recurrence-only kernel. Spike outputs must match exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.tvm.testing import build_vm, with_kernels
from toolchain.core.profile import load_profile
from toolchain.export import run_ort, torch_to_onnx
from toolchain.zoo.spiking import LIF, SpikingMLP


def _inputs(rng: np.random.Generator) -> list[np.ndarray]:
    """Random images with many exact zeros (skipped input rows), a fully dense one, and a blank one."""
    sparse = rng.random((1, 784)).astype(np.float32)
    sparse[sparse < 0.5] = 0.0
    return [rng.random((1, 784)).astype(np.float32), sparse, np.ones((1, 784), np.float32),
            np.zeros((1, 784), np.float32)]


@pytest.mark.parametrize(("reset", "steps"), [("subtract", 8), ("zero", 8), ("subtract", 16)])
def test_fused_lif_layer_matches_generic_and_ort(reset: str, steps: int) -> None:
    torch.manual_seed(0)
    net = SpikingMLP(hidden=[37], steps=steps, beta=0.875, threshold=1.0, reset=reset,
                     surrogate="fast_sigmoid").eval()
    with torch.no_grad():  # enough current that neurons actually spike
        for fc in net.fcs:
            fc.weight.mul_(4.0)
    model = torch_to_onnx(net, (torch.rand(1, 784),), dynamic_batch=False)
    base = load_profile("x86-avx512")
    generic, gtable = build_vm(model, base, substitute=False)
    assert all(r["origin"] == "generic" for r in gtable)
    # The layer kernel at any T, and the profile's default (above lif_layer_max_rows: GEMV + fused recurrence).
    for prof, kernels in ((with_kernels(base, lif_layer_max_rows=steps), {"lif-layer-f32": 2}),
                          (base, {"lif-layer-f32": 2} if steps <= base.kernels.lif_layer_max_rows
                           else {"lif-fused-f32": 2, "gemv-packed-f32": 2})):
        fused, table = build_vm(model, prof)
        names = [r["kernel"] for r in table]
        assert {k: names.count(k) for k in kernels} == kernels, names
        total = 0.0
        for x in _inputs(np.random.default_rng(1)):
            want = run_ort(model, [{model.graph.input[0].name: x}])[0][0]
            np.testing.assert_array_equal(fused(x), generic(x))
            np.testing.assert_array_equal(fused(x), want)
            total += float(want.sum())
        assert total > 0  # spikes reached the output: the comparison saw real recurrences


class _Recurrence(torch.nn.Module):
    """LIF over T steps of a current given as the input (no matmul in the graph)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.lif, self.steps = LIF(0.9, 1.0, "subtract", steps), steps

    def forward(self, cur: torch.Tensor) -> torch.Tensor:
        u = torch.zeros(1, cur.shape[1])
        out = []
        for t in range(self.steps):
            s, u = self.lif(cur[t : t + 1], u)
            out.append(s)
        return torch.cat(out, 0)


def test_fused_recurrence_without_matmul() -> None:
    model = torch_to_onnx(_Recurrence(8).eval(), (torch.rand(8, 21),), dynamic_batch=False)
    prof = load_profile("x86-avx512")
    fused, table = build_vm(model, prof)
    generic, _ = build_vm(model, prof, substitute=False)
    assert [r["kernel"] for r in table] == ["lif-fused-f32"]
    x = (np.random.default_rng(3).random((8, 21)) * 1.5).astype(np.float32)
    np.testing.assert_array_equal(fused(x), generic(x))
    assert fused(x).sum() > 0


def test_fused_lif_off_in_profile() -> None:
    net = SpikingMLP(hidden=[8], steps=4, beta=0.9, threshold=1.0, reset="zero", surrogate="fast_sigmoid").eval()
    model = torch_to_onnx(net, (torch.rand(1, 784),), dynamic_batch=False)
    _, table = build_vm(model, with_kernels(load_profile("x86-avx512"), use_fused_lif=False))
    assert not {"lif-fused-f32", "lif-layer-f32"} & {r["kernel"] for r in table}
