"""NN-Factory: the assembler materialises a compact static model (no gating) from a real supernet."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx
import pytest
import torch

from toolchain.core.cache import Cache
from toolchain.core.errors import UsageError
from toolchain.export import export_module
from toolchain.zoo import nnfactory as nf
from toolchain.zoo.datasets import Dataset, load_dataset
from toolchain.zoo.trained import load_trained

# Ops that would mean runtime routing / gating / masking in the generated graph.
GATING_OPS = {"If", "Loop", "Where", "Gather", "GatherElements", "GatherND", "TopK", "ArgMax", "Scan",
              "NonZero", "Compress", "Mul"}


@pytest.fixture(scope="module")
def supernet(fashion: Dataset, tmp_path_factory: pytest.TempPathFactory) -> nf.Supernet:
    e = dataclasses.replace(nf.SUPERNET_ENTRY, recipe={**nf.SUPERNET_ENTRY.recipe, "epochs": 1})
    small = dataclasses.replace(fashion, x_train=fashion.x_train[:6000], y_train=fashion.y_train[:6000])
    net, metrics, _, _ = load_trained(e, Cache(tmp_path_factory.mktemp("nnf")), data=small, progress=False)
    assert metrics["test_accuracy"] > 0.5
    return net


@pytest.mark.parametrize("sparsity", nf.BUDGETS)
def test_assembled_model_is_the_supernet_restricted(supernet: nf.Supernet, fashion: Dataset,
                                                    sparsity: float) -> None:
    task = (0, 2, 4, 6)
    t0 = time.perf_counter()
    model = nf.assemble(task, sparsity, net=supernet)
    assert time.perf_counter() - t0 <= 5.0  # the bound on generation; it takes milliseconds
    sel, k, ke, w = nf.plan(supernet, task, sparsity)
    assert sel == [0, 1] and supernet.widths(w) == (k, ke)
    x = torch.from_numpy(fashion.x_test[:500])
    with torch.no_grad():
        torch.testing.assert_close(model(x), supernet(x, w)[:, list(task)], rtol=1e-5, atol=1e-5)
    # The budget holds: non-zero parameters <= (1 - sparsity) x the selected modules at full width.
    _, kf, kef, _ = nf.plan(supernet, task, 0.0)
    full = 784 * kf + kf + 2 * (kf * kef + kef) + 4 * (kef + 1)
    nnz = sum(int((p != 0).sum()) for p in model.parameters())
    assert nnz <= (1 - sparsity) * full


def test_generated_graph_is_static_with_parity(supernet: nf.Supernet, cache: object) -> None:
    task = (5, 7, 9)
    model = nf.assemble(task, 0.75, net=supernet)
    data = load_dataset("fashion-mnist:5,7,9")
    assert data.num_classes == 3 and set(np.unique(data.y_test)) == {0, 1, 2}
    art, _ = export_module(model, (1, 784), cache, "nnf-test", check_inputs=data.x_test[:1000])  # type: ignore[arg-type]
    assert art.meta["parity"]["max_rel"] <= 1e-4 and art.meta["parity"]["argmax_agreement"] == 1.0
    g = onnx.load(str(art.payload)).graph
    ops = {n.op_type for n in g.node}
    assert not ops & GATING_OPS, ops
    assert g.output[0].type.tensor_type.shape.dim[1].dim_value == 3  # only the task's classes


def test_bad_task_and_budget(supernet: nf.Supernet) -> None:
    with pytest.raises(UsageError, match="subset"):
        nf.assemble([], 0.5, net=supernet)
    with pytest.raises(UsageError, match="subset"):
        nf.assemble([3, 11], 0.5, net=supernet)
    with pytest.raises(UsageError, match="sparsity"):
        nf.assemble([3], 1.0, net=supernet)
