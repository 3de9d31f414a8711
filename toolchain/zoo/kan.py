"""KAN families on Fashion-MNIST: B-spline KAN, FastKAN, ChebyKAN, S-KAN and a Conv-KAN.

Layers live in ``kan_bases`` (single-basis), ``skan`` (basis selection) and ``convkan``; this module
holds the networks, the training recipes and the zoo entries.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.convkan import ConvKANNet
from toolchain.zoo.g2gnet import limited_context, single_thread
from toolchain.zoo.kan_bases import BSplineKANLayer, ChebyKANLayer, FastKANLayer
from toolchain.zoo.skan import SKANNet
from toolchain.zoo.training import evaluate, train_classifier


class KANNet(nn.Module):
    """A stack of single-basis KAN layers (784 -> hidden... -> 10)."""

    def __init__(self, kind: str, widths: list[int], num_basis: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            if kind == "bspline":
                layers.append(BSplineKANLayer(a, b, grid_size=num_basis - 3, order=3))
            elif kind == "rbf":
                layers.append(FastKANLayer(a, b, num_centers=num_basis))
            elif kind == "cheby":
                if i > 0:  # ChebyKAN's reference MNIST net puts a LayerNorm between layers
                    layers.append(nn.LayerNorm(a))
                layers.append(ChebyKANLayer(a, b, degree=num_basis - 1))
            else:
                raise ValueError(f"KAN kind must be bspline, rbf or cheby, not {kind!r}")
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_kan(recipe: Mapping[str, Any]) -> nn.Module:
    return KANNet(recipe["kind"], [784, *recipe["hidden"], 10], recipe["num_basis"])


def build_skan(recipe: Mapping[str, Any]) -> nn.Module:
    return SKANNet([784, *recipe["hidden"], 10], recipe["num_basis"], tuple(recipe["pool"]))


def build_convkan(recipe: Mapping[str, Any]) -> nn.Module:
    return ConvKANNet(tuple(recipe["channels"]), tuple(recipe["centers"]))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_kan(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    with single_thread():
        metrics = train_classifier(model, limited_context(ctx, recipe), epochs=recipe["epochs"], lr=recipe["lr"],
                                   batch=recipe["batch"], weight_decay=recipe.get("weight_decay", 0.0),
                                   desc=f"kan {recipe.get('kind', 'conv')}")
    metrics["params"] = _params(model)
    return metrics


def train_skan(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Full training with every basis, then per-node selection, then fine-tuning of the pruned net."""
    assert isinstance(model, SKANNet)
    if recipe.get("selection", "taylor-centred") != "taylor-centred":
        raise ValueError("S-KAN selection must be 'taylor-centred' (see toolchain.zoo.skan)")
    ctx = limited_context(ctx, recipe)
    common = {"lr": recipe["lr"], "batch": recipe["batch"]}
    with single_thread():
        full = train_classifier(model, ctx, epochs=recipe["epochs_full"], desc="skan full", **common)
        n = recipe["select_samples"]
        model.select(torch.from_numpy(ctx.data.x_train[:n]), torch.from_numpy(ctx.data.y_train[:n]))
        selected_acc = evaluate(model, ctx.data.x_test, ctx.data.y_test)
        tuned = train_classifier(model, ctx, epochs=recipe["epochs_prune"], desc="skan pruned", **common)
    pruned_params = sum(int(layer.node_mask().sum()) * layer.out_features for layer in model.layers) + sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith("coeff"))
    return {
        "test_accuracy": tuned["test_accuracy"],
        "full_pool_accuracy": full["test_accuracy"],
        "selected_untuned_accuracy": selected_acc,
        "epochs": recipe["epochs_full"] + recipe["epochs_prune"],
        "steps": full["steps"] + tuned["steps"],
        "train_seconds": round(full["train_seconds"] + tuned["train_seconds"], 1),
        "stopped_early": full["stopped_early"] or tuned["stopped_early"],
        "choices": [layer.choice_counts() for layer in model.layers],
        "params": pruned_params,
        "params_full_pool": _params(model),
    }


def _skan_export(module: nn.Module, form: str) -> nn.Module:
    return module.frozen() if isinstance(module, SKANNet) else module


KAN_COMMON = {"hidden": [64], "num_basis": 8, "epochs": 6, "lr": 2e-3, "batch": 128}


def _kan_entry(name: str, kind: str, summary: str) -> ZooEntry:
    return ZooEntry(name=name, family="kan", summary=summary, dataset="fashion-mnist", input_shape=(1, 784),
                    recipe={**KAN_COMMON, "kind": kind}, build=build_kan, train=train_kan, tags=("kan",))


def _skan_entry(name: str, pool: tuple[str, ...]) -> ZooEntry:
    return ZooEntry(name=name, family="kan",
                    summary=f"S-KAN 784-64-10: per-node basis chosen from {{{', '.join(pool)}}}, pruned, frozen",
                    dataset="fashion-mnist", input_shape=(1, 784),
                    recipe={"hidden": [64], "num_basis": 8, "pool": list(pool), "epochs_full": 4, "epochs_prune": 8,
                            "select_samples": 4096, "selection": "taylor-centred", "lr": 2e-3, "batch": 128},
                    build=build_skan, train=train_skan, export_module=_skan_export, tags=("kan",))


ENTRIES = (
    _kan_entry("kan-bspline", "bspline", "B-spline KAN 784-64-10 (efficient-kan: SiLU base + G=5, k=3 spline)"),
    _kan_entry("kan-fast", "rbf", "FastKAN 784-64-10 (8 Gaussian RBFs on LayerNorm + SiLU base)"),
    _kan_entry("kan-cheby", "cheby", "ChebyKAN 784-64-10 (degree 7 by recurrence on tanh)"),
    _skan_entry("skan", ("bspline", "rbf", "cheby")),
    _skan_entry("skan-local", ("bspline", "rbf")),
    ZooEntry(name="convkan", family="kan", summary="Conv-KAN: RBF expansion per channel + Conv2d, 1x28x28 input",
             dataset="fashion-mnist", input_shape=(1, 1, 28, 28),
             recipe={"channels": [8, 16], "centers": [8, 4], "epochs": 3, "lr": 2e-3, "batch": 128},
             build=build_convkan, train=train_kan, tags=("kan", "conv")),
)
