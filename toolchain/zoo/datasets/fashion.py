"""Real, offline datasets. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``.

Every loader returns a ``Dataset`` with a content hash, used to key trained-weight artifacts.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.core.errors import InfraError, UsageError

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str  # of the raw files: keys trained weights
    num_classes: int


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise UsageError(f"{path} is not an unsigned-byte IDX file; reinstall dataset-fashion-mnist")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise UsageError(f"{path} is truncated ({arr.size} of {int(np.prod(dims))} values)")
    return arr.reshape(dims)


def fashion_mnist_dir(data_dir: Path | str | None = None) -> Path:
    cands = [Path(data_dir)] if data_dir else []
    if os.environ.get("EDGEC_FASHION_MNIST"):
        cands.append(Path(os.environ["EDGEC_FASHION_MNIST"]))
    cands += [Path(d) for d in FASHION_DIRS]
    for d in cands:
        if (d / "t10k-images-idx3-ubyte.gz").is_file():
            return d
    raise InfraError(
        "Fashion-MNIST not found; install it with 'apt-get install dataset-fashion-mnist' "
        "or pass --data-dir pointing at the IDX .gz files"
    )


def fashion_mnist(data_dir: Path | str | None = None) -> Dataset:
    """Fashion-MNIST as float32 in [0, 1], images flattened to 784, labels int64."""
    d = fashion_mnist_dir(data_dir)
    files = [f"{s}-{k}" for s in ("train", "t10k") for k in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz")]
    h = hashlib.sha256()
    for f in files:
        h.update((d / f).read_bytes())
    xtr = _read_idx(d / files[0]).reshape(-1, 784).astype(np.float32) / 255.0
    ytr = _read_idx(d / files[1]).astype(np.int64)
    xte = _read_idx(d / files[2]).reshape(-1, 784).astype(np.float32) / 255.0
    yte = _read_idx(d / files[3]).astype(np.int64)
    return Dataset("fashion-mnist", xtr, ytr, xte, yte, h.hexdigest(), 10)


def load_npz(path: Path | str) -> Dataset:
    """A user's labelled set: an .npz with arrays ``x`` and ``y`` (test split only; no pickles)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"dataset file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    except (KeyError, ValueError, OSError) as e:
        raise UsageError(f"{p} must be an .npz with float array 'x' and int array 'y' ({e})") from None
    empty = np.zeros((0,) + x.shape[1:], np.float32)
    h = hashlib.sha256(p.read_bytes()).hexdigest()
    return Dataset(p.stem, empty, np.zeros(0, np.int64), x, y, h, int(y.max()) + 1)


DATASETS = {"fashion-mnist": fashion_mnist}


def load_dataset(name: str, data_dir: Path | str | None = None) -> Dataset:
    """A dataset by name (``fashion-mnist``, ``cora``, ``citeseer``) or an .npz path."""
    if name.endswith(".npz"):
        return load_npz(name)
    if name.startswith("fashion-mnist:"):  # a class subset, e.g. fashion-mnist:5,7,9 (NN-Factory tasks)
        from toolchain.zoo import nnfactory

        return nnfactory.task_dataset(name, data_dir)
    if name in ("cora", "citeseer"):
        from toolchain.zoo import planetoid

        return planetoid.load_planetoid_dataset(name, data_dir)
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; use fashion-mnist, cora, citeseer or a .npz file")
    return DATASETS[name](data_dir)
