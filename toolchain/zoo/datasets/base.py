"""The dataset every loader returns, and a user's labelled set from an .npz file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.core.errors import UsageError


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str  # of the raw files: keys trained weights
    num_classes: int


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
    empty = np.zeros((0, *x.shape[1:]), np.float32)
    h = hashlib.sha256(p.read_bytes()).hexdigest()
    return Dataset(p.stem, empty, np.zeros(0, np.int64), x, y, h, int(y.max()) + 1)
