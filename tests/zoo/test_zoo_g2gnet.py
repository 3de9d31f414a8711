"""G2GNet: mask structure, sparsity, DST rewiring, folding, and ONNX parity on real Fashion-MNIST."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from zoo_helpers import full_test_parity

from toolchain.export import export_module
from toolchain.zoo import ZooEntry
from toolchain.zoo.g2gnet import (
    ENTRIES,
    G2G_RECIPE,
    FoldedG2GLinear,
    G2GNet,
    G2GRewirer,
    dense_match_hidden,
)
from toolchain.zoo.registry import get_entry
from toolchain.zoo.trained import load_trained

TINY = {"epochs": 1, "train_limit": 2000}


def _tiny(name: str, **over: Any) -> ZooEntry:
    e = get_entry(name)
    return dataclasses.replace(e, recipe={**e.recipe, **TINY, **over})


def _column_sets(layer: Any) -> list[set[int]]:
    return [set(c) for _, c in layer.layout()]


@pytest.mark.parametrize("granularity", ["column", "weight"])
@pytest.mark.parametrize("grouping", ["index", "mixer", "random"])
def test_mask_is_block_dense_and_sparse_across(grouping: str, granularity: str) -> None:
    net = G2GNet({**G2G_RECIPE, "grouping": grouping, "granularity": granularity})
    assert net.sparsity() >= 0.75
    for layer in net.sparse:
        same = layer.same_group()
        assert bool((layer.mask[same] == 1).all()), "p_intra=1: every intra-group weight is active"
        assert 0 < float(layer.mask[~same].mean()) <= 0.15, "cross-group connections are sparse"
        assert layer.sparsity() >= 0.74
        # rows rescaled by sqrt(fan_in / active fan_in)
        expect = torch.sqrt(layer.in_features / layer.mask.sum(1, keepdim=True))
        assert torch.allclose(layer.scale, expect)


def test_column_granularity_shares_foreign_columns_per_group() -> None:
    net = G2GNet(G2G_RECIPE)
    for layer in net.sparse:
        sizes = set()
        for rows, cols in layer.layout():
            sub = layer.mask[rows][:, cols]
            assert bool((sub == 1).all()), "every row of a group listens to the same columns"
            assert int(layer.mask[rows].sum()) == len(rows) * len(cols)
            sizes.add(len(cols))
        assert len(sizes) == 1, "every group has the same number of active columns (batched MatMul)"


def test_mixer_alternates_contiguous_and_interleaved() -> None:
    net = G2GNet(G2G_RECIPE)
    first, second = net.sparse
    assert first.in_group.tolist() == (torch.arange(784) * 8 // 784).tolist()
    assert first.out_group.tolist() == (torch.arange(512) % 8).tolist()
    assert second.out_group.tolist() == (torch.arange(512) * 8 // 512).tolist()


def _record_real_batch(net: G2GNet, x: np.ndarray) -> None:
    net.train()
    net.record = True
    net(torch.from_numpy(x[:256]))
    net.record = False


@pytest.mark.parametrize("granularity", ["column", "weight"])
@pytest.mark.parametrize("prune,regrow", [("magnitude", "correlation"), ("hebbian", "random")])
def test_dst_keeps_sparsity_and_changes_mask(fashion: Any, granularity: str, prune: str, regrow: str) -> None:
    net = G2GNet({**G2G_RECIPE, "granularity": granularity})
    before = [layer.mask.clone() for layer in net.sparse]
    nnz0 = net.weight_counts()[0]
    _record_real_batch(net, fashion.x_train)
    rw = G2GRewirer(net, every=10, fraction=0.3, prune=prune, regrow=regrow, stop_step=100)
    rw(10)  # a rewiring step
    assert rw.rewired > 0
    assert net.weight_counts()[0] == nnz0 and net.sparsity() >= 0.75
    for layer, m0 in zip(net.sparse, before, strict=True):
        assert bool((layer.mask != m0).any()), "the mask changed"
        assert bool((layer.mask[layer.same_group()] == 1).all()), "intra-group blocks are never pruned"
        assert torch.allclose(layer.scale, torch.sqrt(layer.in_features / layer.mask.sum(1, keepdim=True)))
    if granularity == "column":
        for layer in net.sparse:
            assert len({len(c) for c in _column_sets(layer)}) == 1
            for rows, cols in layer.layout():
                assert bool((layer.mask[rows][:, cols] == 1).all())


def test_correlation_regrow_picks_most_correlated_columns(fashion: Any) -> None:
    net = G2GNet(G2G_RECIPE)
    _record_real_batch(net, fashion.x_train)
    rw = G2GRewirer(net, every=10, fraction=0.3, prune="magnitude", regrow="correlation", stop_step=100)
    layer = net.sparse[0]
    pre, post = net.acts[0]

    def z(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean(0)) / (t.std(0) + 1e-5)

    corr = (z(post).T @ z(pre)).abs() / len(pre)
    rows0, cols0 = layer.layout()[0]
    cand = [c for c in range(784) if c not in set(cols0)]
    rw(10)
    grown = sorted(set(layer.layout()[0][1]) - set(cols0))
    score = corr[rows0].sum(0)
    best = sorted(torch.tensor(cand)[score[cand].topk(len(grown)).indices].tolist())
    assert grown == best


def test_dense_match_has_same_nonzero_weight_count() -> None:
    nnz, _ = G2GNet(G2G_RECIPE).weight_counts()
    h = dense_match_hidden(G2G_RECIPE)
    dense = 784 * h + h * h + h * 10
    assert abs(dense - nnz) / nnz < 0.01
    assert get_entry("g2gnet-dense-match").recipe["hidden"] == [h, h]


def test_rewiring_stays_out_of_forward_and_export(fashion: Any) -> None:
    net = G2GNet(G2G_RECIPE).eval()
    folded = net.folded()
    x = torch.from_numpy(fashion.x_test[:500])
    with torch.no_grad():
        assert torch.equal(folded(x), net(x))
    kinds = [m for m in folded.modules() if isinstance(m, FoldedG2GLinear)]
    assert len(kinds) == 2 and all(dict(m.named_buffers()).keys() == {"weight", "bias"} for m in kinds)
    layout = net.sparse[0].layout()  # column granularity: every group reads as many input columns
    assert len(layout) == 8 and len({len(cols) for _rows, cols in layout}) == 1


@pytest.mark.parametrize("name", [e.name for e in ENTRIES])
def test_entry_trains_and_exports_with_parity_on_real_test_set(name: str, fashion: Any, session_cache: Any) -> None:
    entry = _tiny(name, **({"dst_every": 5} if "dst_every" in get_entry(name).recipe else {}))
    module, metrics, wart, _ = load_trained(entry, session_cache, data=fashion, progress=False)
    assert metrics["test_accuracy"] > 0.5  # one epoch on 3000 real samples already learns
    if isinstance(module, G2GNet):
        assert metrics["sparsity"] >= 0.75 and metrics["rewired_connections"] > 0
    exp = entry.export_module(module, "default") if entry.export_module else module
    art, _ = export_module(exp, entry.input_shape, session_cache, wart.key,
                           check_inputs=fashion.x_test[:1000])
    assert art.meta["parity"]["max_rel"] <= 1e-4 and art.meta["parity"]["argmax_agreement"] == 1.0
    model = onnx.load(str(art.payload))
    assert {n.op_type for n in model.graph.node} <= {"Gemm", "Relu", "MatMul", "Add"}
    # the whole real test set, ORT vs the trained (unfolded) torch module
    parity = full_test_parity(module, model, fashion.x_test)
    assert parity.max_rel <= 1e-4 and parity.argmax_agreement == 1.0
    if isinstance(module, G2GNet):
        # mask and scale are folded: the exported weight has exactly the mask's zeros
        w = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if int(np.prod(t.dims)) == 784 * 512]
        assert len(w) == 1 and float((w[0] != 0).mean()) <= 0.25
