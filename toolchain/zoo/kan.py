"""KAN families on Fashion-MNIST: B-spline KAN, FastKAN, ChebyKAN and a Conv-KAN.

Layers live in ``kan_bases`` (single-basis) and ``convkan``; this module holds the networks, the
training recipes and the zoo entries. S-KAN (basis selection) is its own family module, ``skan``, so
editing it does not change these entries' training-code digest (and retrain them).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.convkan import ConvKANNet
from toolchain.zoo.kan_bases import BSplineKANLayer, ChebyKANLayer, FastKANLayer
from toolchain.zoo.training import limited_context, single_thread, train_classifier


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


KAN_COMMON = {"hidden": [64], "num_basis": 8, "epochs": 6, "lr": 2e-3, "batch": 128}


def _kan_entry(name: str, kind: str, summary: str, epochs: int = KAN_COMMON["epochs"]) -> ZooEntry:
    return ZooEntry(name=name, family="kan", summary=summary, dataset="fashion-mnist", input_shape=(1, 784),
                    recipe={**KAN_COMMON, "kind": kind, "epochs": epochs}, build=build_kan, train=train_kan,
                    tags=("kan",))


ENTRIES = (
    _kan_entry("kan-bspline", "bspline", "B-spline KAN 784-64-10 (efficient-kan: SiLU base + G=5, k=3 spline)"),
    _kan_entry("kan-fast", "rbf", "FastKAN 784-64-10 (8 Gaussian RBFs on LayerNorm + SiLU base)"),
    _kan_entry("kan-cheby", "cheby", "ChebyKAN 784-64-10 (degree 7 by recurrence on tanh)"),
    # Same net as kan-fast with S-KAN's total epoch budget (full pool + pruned fine-tuning): the fair
    # equal-training comparison for S-KAN (scripts/zoo_g2g_kan.py checks the budgets match).
    _kan_entry("kan-fast-long", "rbf", "FastKAN 784-64-10 trained 12 epochs (S-KAN's budget)", epochs=12),
    ZooEntry(name="convkan", family="kan", summary="Conv-KAN: RBF expansion per channel + Conv2d, 1x28x28 input",
             dataset="fashion-mnist", input_shape=(1, 1, 28, 28),
             recipe={"channels": [8, 16], "centers": [8, 4], "epochs": 3, "lr": 2e-3, "batch": 128},
             build=build_convkan, train=train_kan, tags=("kan", "conv")),
)
