"""Class subsets of Fashion-MNIST, named ``fashion-mnist:<classes>`` (e.g. ``fashion-mnist:5,7,9``): the
tasks NN-Factory assembles models for. Labels are renumbered 0..n-1 in class order."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from toolchain.core.errors import UsageError
from toolchain.zoo.datasets.base import Dataset
from toolchain.zoo.datasets.fashion import fashion_mnist

SUBSET_PREFIX = "fashion-mnist:"


def subset_classes(name: str) -> list[int]:
    """``fashion-mnist:0,2,4,6`` -> [0, 2, 4, 6] (sorted, unique, each in 0..9)."""
    try:
        task = sorted({int(c) for c in name.removeprefix(SUBSET_PREFIX).split(",")})
    except ValueError:
        task = []
    if not name.startswith(SUBSET_PREFIX) or not task or any(c < 0 or c > 9 for c in task):
        raise UsageError(f"dataset {name!r} must be fashion-mnist:<classes> with classes in 0..9, "
                         "e.g. fashion-mnist:0,2,4,6")
    return task


def class_subset(name: str, data_dir: Path | str | None = None) -> Dataset:
    """Fashion-MNIST restricted to the classes ``name`` lists, labels renumbered 0..n-1."""
    task = subset_classes(name)
    full = fashion_mnist(data_dir)
    remap = np.full(10, -1, np.int64)
    remap[task] = np.arange(len(task))
    mtr, mte = np.isin(full.y_train, task), np.isin(full.y_test, task)
    sha = hashlib.sha256((full.sha256 + name).encode()).hexdigest()
    return Dataset(name, full.x_train[mtr], remap[full.y_train[mtr]], full.x_test[mte], remap[full.y_test[mte]],
                   sha, len(task))
