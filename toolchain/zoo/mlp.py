"""Plain dense MLP on Fashion-MNIST: the embedded default model and the dense baseline for others."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from torch import nn

from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.training import train_classifier


def build_mlp(recipe: Mapping[str, Any]) -> nn.Module:
    dims = [784, *recipe["hidden"], 10]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train_mlp(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    return train_classifier(model, ctx, epochs=recipe["epochs"], lr=recipe["lr"], batch=recipe["batch"],
                            desc=f"mlp {recipe['hidden']}")


def _entry(name: str, hidden: tuple[int, ...], epochs: int, summary: str) -> ZooEntry:
    return ZooEntry(
        name=name,
        family="mlp",
        summary=summary,
        dataset="fashion-mnist",
        input_shape=(1, 784),
        recipe={"hidden": list(hidden), "epochs": epochs, "lr": 2e-3, "batch": 128},
        build=build_mlp,
        train=train_mlp,
    )


ENTRIES = (
    _entry("mlp-small", (256, 256), 4, "784-256-256-10 dense MLP (0.27 M params): the demo default"),
    _entry("mlp-1m", (1024, 512, 256), 6, "784-1024-512-256-10 dense MLP (1.5 M params)"),
)
