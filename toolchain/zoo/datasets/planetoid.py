"""Cora / Citeseer from the raw Planetoid files (``ind.<name>.{x,y,tx,ty,allx,ally,graph,test.index}``).

The files are Python 2 pickles. Unpickling runs code chosen by the file's author, so every file's
sha256 is checked against the table below BEFORE it is opened, and the unpickler only resolves the
handful of numpy / scipy.sparse / builtins globals these files need. Split: the public Kipf & Welling
split (train = first 20 per class as stored, val = next 500, test = the 1000 listed test nodes);
Citeseer's isolated test nodes are handled as PyG does (zero rows for the missing indices).
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.errors import UsageError
from toolchain.zoo.datasets.base import Dataset

PLANETOID_NAMES = ("cora", "citeseer")
PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")

# sha256 of the public Planetoid raw files (github.com/kimiyoung/planetoid, as mirrored by PyG).
KNOWN_SHA256: dict[str, str] = {
    "ind.citeseer.allx": "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668",
    "ind.citeseer.ally": "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95",
    "ind.citeseer.graph": "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7",
    "ind.citeseer.test.index": "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4",
    "ind.citeseer.tx": "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21",
    "ind.citeseer.ty": "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce",
    "ind.citeseer.x": "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6",
    "ind.citeseer.y": "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924",
    "ind.cora.allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
    "ind.cora.ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
    "ind.cora.graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
    "ind.cora.test.index": "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
    "ind.cora.tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
    "ind.cora.ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
    "ind.cora.x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
    "ind.cora.y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
}
NUM_VAL = 500


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import scipy.sparse as sp

    try:  # numpy >= 2 moved the implementation; old pickles name numpy.core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("scipy.sparse.csr", "csr_matrix"): sp.csr_matrix,
        ("scipy.sparse._csr", "csr_matrix"): sp.csr_matrix,
        ("__builtin__", "list"): list,
        ("builtins", "list"): list,
        ("collections", "defaultdict"): collections.defaultdict,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a Planetoid file needs; anything else is refused."""

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        allowed = RestrictedUnpickler._ALLOWED
        if allowed is None:
            allowed = RestrictedUnpickler._ALLOWED = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a Planetoid file")
        return allowed[(module, name)]


def _verified_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise UsageError(
            f"Planetoid file {path} is missing; pass --data-dir pointing at the raw ind.<name>.* files "
            "(github.com/kimiyoung/planetoid/tree/master/data)"
        )
    data = path.read_bytes()
    want = KNOWN_SHA256.get(path.name)
    got = hashlib.sha256(data).hexdigest()
    if want is None or got != want:
        raise UsageError(
            f"{path} has sha256 {got[:16]}..., not the published {str(want)[:16]}...; refusing to unpickle it, "
            "replace it with the original Planetoid file"
        )
    return data


def _unpickle(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


@dataclass(frozen=True)
class GraphDataset(Dataset):
    """A node-classification graph. ``x_train``/``x_test`` are the public split's node features, so the
    deployed MLP (features only) is benchmarked on ``x_test``; the graph is for training teachers."""

    x_all: np.ndarray  # (N, F) row-normalised features
    y_all: np.ndarray  # (N,) labels (0 for Citeseer's isolated test-index holes, never used)
    edge_index: np.ndarray  # (2, E) int64, symmetric, no self loops
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray


def planetoid_dir(data_dir: Path | str | None) -> Path:
    if data_dir is None:
        raise UsageError("Cora/Citeseer need --data-dir pointing at the raw Planetoid ind.<name>.* files")
    d = Path(data_dir)
    if not d.is_dir():
        raise UsageError(f"--data-dir {d} is not a directory; point it at the raw Planetoid ind.<name>.* files")
    return d


def load_planetoid_dataset(name: str, data_dir: Path | str | None) -> GraphDataset:
    """Verified, restricted load of Cora or Citeseer with the public split."""
    import scipy.sparse as sp

    if name not in PLANETOID_NAMES:
        raise UsageError(f"unknown Planetoid dataset {name!r}; use cora or citeseer")
    d = planetoid_dir(data_dir)
    raw = {p: _verified_bytes(d / f"ind.{name}.{p}") for p in PARTS}  # every hash checked before any unpickle
    h = hashlib.sha256()
    for p in PARTS:
        h.update(hashlib.sha256(raw[p]).digest())
    obj = {p: _unpickle(raw[p]) for p in PARTS if p != "test.index"}
    test_index = np.array([int(v) for v in raw["test.index"].decode().split()], dtype=np.int64)
    test_sorted = np.sort(test_index)
    tx, ty = obj["tx"], np.asarray(obj["ty"])
    if name == "citeseer":
        # Some test nodes are isolated and absent from tx: pad with zero rows over the full index range (PyG).
        full = test_sorted[-1] - test_sorted[0] + 1
        tx_ext = sp.lil_matrix((full, tx.shape[1]), dtype=np.float32)
        tx_ext[test_sorted - test_sorted[0], :] = tx
        ty_ext = np.zeros((full, ty.shape[1]), dtype=ty.dtype)
        ty_ext[test_sorted - test_sorted[0], :] = ty
        tx, ty = tx_ext, ty_ext
    feats = sp.vstack([obj["allx"], tx]).tolil()
    feats[test_index, :] = feats[test_sorted, :]
    x = np.asarray(feats.todense(), dtype=np.float32)
    labels = np.vstack([np.asarray(obj["ally"]), ty])
    labels[test_index, :] = labels[test_sorted, :]
    y = labels.argmax(1).astype(np.int64)
    rs = x.sum(1, keepdims=True)
    x = x / np.where(rs == 0, 1.0, rs)  # row-normalised, as in GCN / GLNN
    n = x.shape[0]
    graph = obj["graph"]
    src, dst = [], []
    for u, nbrs in graph.items():
        for v in nbrs:
            if u != v and u < n and v < n:
                src += [u, v]
                dst += [v, u]
    ei = np.unique(np.array([src, dst], dtype=np.int64), axis=1)
    n_train = np.asarray(obj["y"]).shape[0]
    train_idx = np.arange(n_train)
    val_idx = np.arange(n_train, n_train + NUM_VAL)
    return GraphDataset(
        name=name, x_train=x[train_idx], y_train=y[train_idx], x_test=x[test_index], y_test=y[test_index],
        sha256=h.hexdigest(), num_classes=int(labels.shape[1]), x_all=x, y_all=y, edge_index=ei,
        train_idx=train_idx, val_idx=val_idx, test_idx=test_index,
    )
