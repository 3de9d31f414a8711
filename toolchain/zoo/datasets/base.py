"""The dataset every loader returns, and a user's labelled set from an .npz file."""

from __future__ import annotations

import hashlib
import zipfile
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
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{p} must be an .npz with float array 'x' and int array 'y' "
                         f"({type(e).__name__}: {str(e)[:120]})") from None
    if x.ndim < 1 or y.ndim != 1 or len(x) == 0 or len(x) != len(y):
        raise UsageError(f"{p}: 'x' must hold one input per label of the 1-D 'y' and at least one, got x of shape "
                         f"{list(x.shape)} and y of shape {list(y.shape)}")
    if y.min() < 0:
        raise UsageError(f"{p}: labels in 'y' must be class indices >= 0, got {int(y.min())}")
    empty = np.zeros((0, *x.shape[1:]), np.float32)
    h = hashlib.sha256(p.read_bytes()).hexdigest()
    return Dataset(p.stem, empty, np.zeros(0, np.int64), x, y, h, int(y.max()) + 1)
