"""Spiking MLP: LIF semantics, and exact ONNX parity (identical spike counts) for both export forms."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from toolchain.core.profile import load_profile
from toolchain.export import export_module, run_ort
from toolchain.zoo.datasets import Dataset
from toolchain.zoo.spiking import ENTRIES, LIF, SpikingMLP, StepCell, rate_code, snap_to_grid
from toolchain.zoo.trained import load_trained

E = {e.name: e for e in ENTRIES}


def test_lif_reset_modes() -> None:
    cur = torch.tensor([[0.6]])
    for reset, after_spike in (("subtract", 0.2), ("zero", 0.0)):
        lif = LIF(beta=0.5, threshold=1.0, reset=reset, steps=4).eval()
        s, u = lif(cur, torch.tensor([[0.0]]))
        assert s.item() == 0.0 and u.item() == pytest.approx(0.6)
        s, u = lif(cur, u)  # 0.5 * 0.6 + 0.6 = 0.9: below threshold
        assert s.item() == 0.0
        s, u = lif(torch.tensor([[0.75]]), u)  # 0.45 + 0.75 = 1.2 > 1: spike, then reset
        assert s.item() == 1.0 and u.item() == pytest.approx(after_spike)


def test_rate_code_is_deterministic_and_counts_floor_tx() -> None:
    x = torch.tensor([[0.0, 0.3, 0.51, 1.0]])
    frames = torch.stack([rate_code(x, t) for t in range(8)])
    assert set(frames.unique().tolist()) <= {0.0, 1.0}
    assert frames.sum(0).tolist() == [[0.0, 2.0, 4.0, 8.0]]


def test_surrogate_gradient_flows() -> None:
    net = SpikingMLP([32], 4, 0.875, 1.0, "subtract", "atan").train()
    x = torch.rand(8, 784)
    net(x).sum().backward()
    assert net.fcs[0].weight.grad is not None and net.fcs[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["snn-mlp", "snn-mlp-zero"])
def test_both_forms_export_with_identical_spikes(name: str, fashion: Dataset, cache: object) -> None:
    # Tiny recipe on a real slice of the training set; parity on the real test set.
    e = dataclasses.replace(E[name], recipe={**E[name].recipe, "epochs": 1, "hidden": [128], "lr": 3e-3})
    small = dataclasses.replace(fashion, x_train=fashion.x_train[:6000], y_train=fashion.y_train[:6000])
    module, metrics, art, _ = load_trained(e, cache, data=small, progress=False)  # type: ignore[arg-type]
    assert metrics["test_accuracy"] > 0.4  # well above chance (0.1) after 47 steps
    check = torch.from_numpy(fashion.x_test[:1000])
    for form in e.forms:
        exp_mod = e.export_module(module, form)  # type: ignore[misc]
        example = e.example_inputs(module, form, check[:1])  # type: ignore[misc]
        feeds = tuple(t.numpy() for t in e.example_inputs(module, form, check))  # type: ignore[misc]
        exp, _ = export_module(exp_mod, e.input_shape, cache, art.key, form=form, example=example,  # type: ignore[arg-type]
                               check_inputs=feeds if len(feeds) > 1 else feeds[0])
        assert exp.meta["parity"] is not None and exp.meta["parity"]["samples"] == 1000
        model = onnx.load(str(exp.payload))
        names = [i.name for i in model.graph.input]
        assert len(names) == len(feeds)
        got = run_ort(model, [dict(zip(names, feeds, strict=True))])[0]
        with torch.no_grad():
            ref = exp_mod(*[torch.from_numpy(f) for f in feeds])
        ref = ref if isinstance(ref, tuple) else (ref,)
        np.testing.assert_array_equal(got[0], ref[0].numpy())  # identical spike counts / spikes
        if form == "unrolled":  # the dynamic-batch export compiles for TVM (batch pinned, shapes folded)
            from targets.tvm import TvmTarget  # imports TVM

            tvm_art, _ = TvmTarget().compile(exp, load_profile("x86-avx512"), cache)  # type: ignore[arg-type]
            runner = TvmTarget().load(tvm_art)
            for i in range(20):
                out = runner.infer({names[0]: feeds[0][i:i + 1]})[0]
                np.testing.assert_array_equal(out, got[0][i:i + 1])
        if form == "step":
            np.testing.assert_array_equal(got[1], ref[1].numpy())  # identical membrane state
            assert ref[0].sum() > 0  # the chosen state really spikes


def test_step_form_streams_to_the_unrolled_counts(fashion: Dataset) -> None:
    net = SpikingMLP([64], 6, 0.875, 1.0, "subtract", "fast_sigmoid").eval()
    with torch.no_grad():
        net.fcs[0].weight.mul_(8.0)  # untrained: scale up so the hidden layer spikes
    snap_to_grid(net)

    cell = StepCell(net)
    x = torch.from_numpy(fashion.x_test[:50])
    u = torch.cat(net.init_state(50), 1)
    counts = torch.zeros(50, 10)
    with torch.no_grad():
        for t in range(net.steps):
            s, u = cell(rate_code(x, t), u)
            counts += s
        torch.testing.assert_close(counts, net(x), rtol=0, atol=0)
    assert counts.sum() > 0
