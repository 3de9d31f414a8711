"""Real, offline datasets, by name: Fashion-MNIST (Debian package ``dataset-fashion-mnist``), its class
subsets ``fashion-mnist:<classes>``, Cora / Citeseer (raw Planetoid files) and a user's .npz file.

Every loader returns a ``Dataset`` with a content hash, used to key trained-weight artifacts. This package
imports no model family.
"""

from __future__ import annotations

from pathlib import Path

from toolchain.core.errors import UsageError
from toolchain.zoo.datasets.base import Dataset, load_npz
from toolchain.zoo.datasets.fashion import fashion_mnist, fashion_mnist_dir
from toolchain.zoo.datasets.planetoid import PLANETOID_NAMES, load_planetoid_dataset
from toolchain.zoo.datasets.subsets import SUBSET_PREFIX, class_subset

__all__ = ["Dataset", "fashion_mnist", "fashion_mnist_dir", "load_dataset", "load_npz"]


def load_dataset(name: str, data_dir: Path | str | None = None) -> Dataset:
    """A dataset by name (``fashion-mnist``, ``fashion-mnist:5,7,9``, ``cora``, ``citeseer``) or an .npz path."""
    if name.endswith(".npz"):
        return load_npz(name)
    if name == "fashion-mnist":
        return fashion_mnist(data_dir)
    if name.startswith(SUBSET_PREFIX):
        return class_subset(name, data_dir)
    if name in PLANETOID_NAMES:
        return load_planetoid_dataset(name, data_dir)
    raise UsageError(f"unknown dataset {name!r}; use fashion-mnist, fashion-mnist:<classes>, cora, citeseer "
                     "or a .npz file")
