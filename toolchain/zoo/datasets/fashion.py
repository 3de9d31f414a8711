"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX .gz files, offline)."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from toolchain.core.errors import InfraError, UsageError
from toolchain.zoo.datasets.base import Dataset

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


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
    """The first of --data-dir, $EDGEC_FASHION_MNIST and the Debian package's directory that holds the files."""
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
