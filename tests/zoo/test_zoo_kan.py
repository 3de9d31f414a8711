"""KAN families: basis maths, S-KAN selection/pruning/freezing, kernel metadata, ONNX parity on real data."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from zoo_helpers import full_test_parity

from toolchain.core.profile import load_profile
from toolchain.export import export_module, torch_to_onnx
from toolchain.zoo import ZooEntry, kan, skan
from toolchain.zoo.convkan import KANConv2d
from toolchain.zoo.kan_bases import (
    BSplineBasis,
    BSplineKANLayer,
    ChebyBasis,
    ChebyKANLayer,
    FastKANLayer,
    RBFBasis,
)
from toolchain.zoo.registry import get_entry
from toolchain.zoo.skan import SKANNet
from toolchain.zoo.trained import load_trained

TINY = {"epochs": 1, "epochs_full": 1, "epochs_prune": 1, "select_holdout": 512, "train_limit": 2000}
# kan-fast-long is kan-fast with more epochs: at the tiny recipe it is the same test twice.
ENTRIES = [e for e in (*kan.ENTRIES, *skan.ENTRIES) if e.name != "kan-fast-long"]


def _tiny(name: str) -> ZooEntry:
    e = get_entry(name)
    return dataclasses.replace(e, recipe={**e.recipe, **{k: v for k, v in TINY.items()
                                                         if k in e.recipe or k == "train_limit"}})


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def test_bspline_basis_is_partition_of_unity_and_matches_cox_de_boor() -> None:
    basis = BSplineBasis(grid_size=5, order=3)
    x = torch.linspace(-0.999, 0.999, 301)[:, None]
    b = basis(x)
    assert b.shape == (301, 1, 8)
    assert torch.allclose(b.sum(-1), torch.ones(301, 1), atol=1e-5)
    assert bool((b >= 0).all())
    # recursive reference (textbook Cox-de Boor) at a few points
    g = basis.grid.tolist()

    def ref(i: int, k: int, t: float) -> float:
        if k == 0:
            return 1.0 if g[i] <= t < g[i + 1] else 0.0
        return ((t - g[i]) / (g[i + k] - g[i]) * ref(i, k - 1, t)
                + (g[i + k + 1] - t) / (g[i + k + 1] - g[i + 1]) * ref(i + 1, k - 1, t))

    for t in (-0.73, 0.0, 0.41):
        got = basis(torch.tensor([[t]]))[0, 0].tolist()
        assert np.allclose(got, [ref(i, 3, t) for i in range(8)], atol=1e-6)


def test_chebyshev_recurrence_equals_cos_n_acos() -> None:
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)[:, None]
    got = ChebyBasis(degree=7).double()(x)[:, 0]
    t = torch.tanh(x[:, 0])
    want = torch.stack([torch.cos(n * torch.acos(t)) for n in range(8)], -1)
    assert torch.allclose(got, want, atol=1e-9)


def test_rbf_basis_peaks_at_centers() -> None:
    basis = RBFBasis(8)
    got = basis(basis.centers[:, None])[:, 0]
    assert torch.allclose(torch.diagonal(got), torch.ones(8))


def test_chebykan_onnx_has_no_acos_or_cos() -> None:
    m = get_entry("kan-cheby").build(get_entry("kan-cheby").recipe).eval()
    ops = _ops(torch_to_onnx(m, (torch.zeros(1, 784),)))
    assert "Tanh" in ops and not ops & {"Acos", "Cos", "Einsum"}


@pytest.mark.parametrize("name,layer", [("kan-bspline", BSplineKANLayer), ("kan-fast", FastKANLayer),
                                        ("kan-cheby", ChebyKANLayer), ("convkan", KANConv2d)])
def test_kan_layers_are_recorded_in_onnx_metadata(name: str, layer: type) -> None:
    e = get_entry(name)
    m = e.build(e.recipe).eval()
    assert any(isinstance(mod, layer) for mod in m.modules())
    model = torch_to_onnx(m, (torch.zeros(e.input_shape),))
    hier = [p.value for n in model.graph.node for p in n.metadata_props if p.key == "pkg.torch.onnx.class_hierarchy"]
    assert any(layer.__name__ in h for h in hier), f"{layer.__name__} not recorded in ONNX node metadata"


def _skan_trained(fashion: Any, n: int = 2048) -> SKANNet:
    torch.manual_seed(0)
    e = get_entry("skan")
    net = e.build(e.recipe)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, y = torch.from_numpy(fashion.x_train[:n]), torch.from_numpy(fashion.y_train[:n])
    for i in range(0, n, 128):  # a few real steps so coefficients carry signal
        loss = torch.nn.functional.cross_entropy(net(x[i:i + 128]), y[i:i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def test_skan_selection_prunes_and_export_has_only_chosen_bases(fashion: Any) -> None:
    net = _skan_trained(fashion)
    with pytest.raises(ValueError, match="selection"):
        net.frozen()
    net.select(torch.from_numpy(fashion.x_train[:512]))
    for layer in net.layers:
        assert layer.selected
        keep = layer.node_mask()
        assert torch.equal(layer.coeff.detach() * (1 - keep)[:, :, None], torch.zeros_like(layer.coeff))
        assert int(keep.sum()) == layer.in_features * layer.num_basis  # one basis per node
    net.eval()
    frozen = net.frozen()
    x = torch.from_numpy(fashion.x_test[:1000])
    with torch.no_grad():
        assert torch.allclose(frozen(x), net(x), atol=1e-4)
    model = torch_to_onnx(frozen, (x[:1],))
    # coefficient initializers hold exactly the chosen (node, basis) rows, nothing of the pool
    sizes = sorted(int(np.prod(t.dims)) for t in model.graph.initializer)
    for layer in net.layers:
        assert layer.in_features * layer.num_basis * layer.out_features in sizes
        assert layer.coeff.numel() not in sizes


def test_skan_selection_keeps_the_gated_function(fashion: Any) -> None:
    """Selection = gate argmax, gate value folded into the coefficients, pruned bases' mean into the bias:
    with converged (near one-hot) gates the pruned net computes what the gated net computed."""
    net = _skan_trained(fashion).eval()
    x = torch.from_numpy(fashion.x_train[-512:])
    with torch.no_grad():
        for layer in net.layers:
            pick = torch.randint(0, 3, (layer.in_features,), generator=torch.Generator().manual_seed(1))
            layer.gate.copy_(torch.nn.functional.one_hot(pick, 3) * 0.5)
    net.set_temperature(0.01)  # the end of annealing: every node uses one basis
    assert net.gate_confidence() > 0.9999
    want_choice = [layer.gate.argmax(1) for layer in net.layers]
    with torch.no_grad():
        before = net(x)
        net.select(x)
        after = net(x)
    assert [layer.choice.tolist() for layer in net.layers] == [c.tolist() for c in want_choice]
    assert torch.allclose(after, before, atol=1e-4)
    # soft gates (start of training): selection changes the function but keeps the layer's mean output
    soft = _copy_of(_skan_trained(fashion, 512))
    last = soft.layers[-1]
    h = soft.layers[0](x).detach()
    with torch.no_grad():
        mean_before = last(h).mean(0)
        last.select(h)
        assert torch.allclose(last(h).mean(0), mean_before, atol=1e-4)


def _copy_of(net: SKANNet) -> SKANNet:
    e = get_entry("skan")
    other = e.build(e.recipe)
    other.load_state_dict(net.state_dict())
    return other.eval()


def test_skan_forced_single_choice_exports_only_that_basis(fashion: Any) -> None:
    net = _skan_trained(fashion, 512)
    for layer in net.layers:
        layer.choice.fill_(1)  # every node picks RBF
    ops = _ops(torch_to_onnx(net.eval().frozen(), (torch.zeros(1, 784),)))
    assert "Exp" in ops and not ops & {"Tanh", "Less", "GreaterOrEqual"}
    for layer in net.layers:
        layer.choice.fill_(2)  # every node picks Chebyshev
    ops = _ops(torch_to_onnx(net.frozen(), (torch.zeros(1, 784),)))
    assert "Tanh" in ops and not ops & {"Exp", "Less", "GreaterOrEqual"}


def test_skan_rbf_variant_pool_freezes_to_described_rbfs_and_fuses_on_tvm(fashion: Any) -> None:
    """A pool of RBF variants (skan.RBF_VARIANTS): each chosen group exports as Exp-only RBFs whose kernel
    description carries that variant's own centers and width, and TVM's fused KAN kernel computes it."""
    from kernels.tvm.testing import build_vm  # imports TVM

    pool = ("rbf", "rbf_smooth", "rbf_high")
    torch.manual_seed(0)
    net = SKANNet([784, 16, 10], 8, pool)
    x = torch.from_numpy(fashion.x_test[:256])
    with torch.no_grad():
        for layer in net.layers:
            layer.coeff.mul_(20)  # large coefficients: a wrong center or width would show
        net.layers[0].gate.copy_(torch.nn.functional.one_hot(torch.arange(784) % 3, 3) * 5.0)
        net.layers[1].gate[:, 1] = 5.0  # the hidden layer: every node takes rbf_smooth
    net.set_temperature(0.01)
    net.select(x)
    assert net.layers[0].choice_counts() == {"rbf": 262, "rbf_smooth": 261, "rbf_high": 261}
    frozen = net.eval().frozen()
    with torch.no_grad():
        assert torch.allclose(frozen(x), net(x), atol=1e-4)
    layer = frozen[0]
    assert layer.kinds == list(pool)
    for name, basis in zip(pool, layer.bases, strict=True):
        want = skan.skan_basis(name, 8)
        assert isinstance(basis, RBFBasis) and torch.equal(basis.centers, want.centers)
        assert basis.inv_width == want.inv_width
    assert len({(tuple(b.centers.tolist()), b.inv_width) for b in layer.bases}) == 3
    model = torch_to_onnx(frozen, (x[:1],), dynamic_batch=False)
    assert "Exp" in _ops(model) and not _ops(model) & {"Tanh", "Less", "GreaterOrEqual"}
    fused, table = build_vm(model, load_profile("x86-avx512"))
    assert "kan-fused-f32" in [r["kernel"] for r in table]  # at least the single-variant hidden layer
    for i in range(4):
        np.testing.assert_allclose(fused(x[i:i + 1].numpy()), frozen(x[i:i + 1]).detach().numpy(),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [e.name for e in ENTRIES])
def test_entry_trains_and_exports_with_parity_on_real_test_set(name: str, fashion: Any, session_cache: Any) -> None:
    entry = _tiny(name)
    module, metrics, wart, _ = load_trained(entry, session_cache, data=fashion, progress=False)
    assert metrics["test_accuracy"] > 0.5
    exp = entry.export_module(module, "default") if entry.export_module else module
    x = fashion.x_test.reshape(-1, *entry.input_shape[1:])
    art, _ = export_module(exp, entry.input_shape, session_cache, wart.key, check_inputs=x[:1000])
    assert art.meta["parity"]["max_rel"] <= 1e-4 and art.meta["parity"]["argmax_agreement"] == 1.0
    model = onnx.load(str(art.payload))
    assert not _ops(model) & {"Einsum", "Acos", "Cos"}
    parity = full_test_parity(module, model, x)  # the trained module itself, not the export form
    assert parity.max_rel <= 1e-4 and parity.argmax_agreement == 1.0
    if name == "skan":
        chosen = [k for counts in metrics["choices"] for k, v in counts.items() if v]
        basis_ops = {"bspline": "GreaterOrEqual", "rbf": "Exp", "cheby": "Tanh"}
        assert {k for k, op in basis_ops.items() if op in _ops(model)} == set(chosen)
