"""Planetoid loading (hash-verified, restricted unpickling) and GNN-to-MLP students: real Cora/Citeseer."""

from __future__ import annotations

import collections
import dataclasses
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from toolchain.core.errors import UsageError
from toolchain.export import export_module
from toolchain.zoo.datasets import load_dataset, planetoid
from toolchain.zoo.gnn_mlp import ENTRIES, TEACHERS, normalized_adjacency
from toolchain.zoo.trained import load_trained

E = {e.name: e for e in ENTRIES}


def _tiny(name: str, epochs: int = 30) -> object:
    e = E[name]
    recipe = {**e.recipe, "epochs": epochs}
    if "teacher_recipe" in recipe:
        recipe["teacher_recipe"] = {**recipe["teacher_recipe"], "epochs": epochs}
    return dataclasses.replace(e, recipe=recipe)


@pytest.mark.parametrize(("name", "nodes", "edges", "train", "classes"),
                         [("cora", 2708, 10556, 140, 7), ("citeseer", 3327, 9104, 120, 6)])
def test_public_split(planetoid_dir: Path, name: str, nodes: int, edges: int, train: int, classes: int) -> None:
    d = planetoid.load_planetoid_dataset(name, planetoid_dir)
    assert d.x_all.shape[0] == nodes and d.edge_index.shape == (2, edges)
    assert len(d.train_idx) == train and len(d.val_idx) == 500 and len(d.test_idx) == 1000
    assert d.num_classes == classes and set(np.unique(d.y_train)) == set(range(classes))
    # x_test / y_test are the public test nodes, so 'edgec bench' scores the deployed MLP on them.
    np.testing.assert_array_equal(d.x_test, d.x_all[d.test_idx])
    np.testing.assert_array_equal(d.y_test, d.y_all[d.test_idx])
    assert np.allclose(d.x_all.sum(1)[d.x_all.sum(1) > 0], 1.0, atol=1e-5)  # row-normalised


def test_tampered_file_is_refused_before_unpickling(planetoid_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for f in planetoid_dir.glob("ind.cora.*"):
        shutil.copy(f, tmp_path / f.name)
    p = tmp_path / "ind.cora.graph"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.chmod(0o644)
    p.write_bytes(bytes(raw))
    opened: list[bool] = []
    monkeypatch.setattr(planetoid, "_unpickle", lambda data: opened.append(True))
    with pytest.raises(UsageError, match="sha256"):
        planetoid.load_planetoid_dataset("cora", tmp_path)
    assert not opened  # every file is verified before any is unpickled


def test_missing_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--data-dir"):
        planetoid.load_planetoid_dataset("cora", tmp_path / "nope")
    with pytest.raises(UsageError, match="missing"):
        planetoid.load_planetoid_dataset("cora", tmp_path)
    with pytest.raises(UsageError, match="--data-dir"):
        planetoid.load_planetoid_dataset("cora", None)


def test_restricted_unpickler_refuses_other_globals() -> None:
    planetoid._unpickle(pickle.dumps(collections.defaultdict(list, {1: [2]}), protocol=2))  # allowed
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        planetoid._unpickle(pickle.dumps(collections.OrderedDict(a=1), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        planetoid._unpickle(pickle.dumps(shutil.rmtree, protocol=2))


def test_gcn_adjacency_is_symmetric_normalised(planetoid_dir: Path) -> None:
    d = planetoid.load_planetoid_dataset("cora", planetoid_dir)
    a = normalized_adjacency(d.edge_index, d.x_all.shape[0]).to_dense()
    assert torch.allclose(a, a.t(), atol=1e-6)
    deg = torch.from_numpy(np.bincount(d.edge_index[0], minlength=a.shape[0]) + 1).float()
    assert torch.allclose(a.diagonal(), 1.0 / deg, atol=1e-6)


def test_teacher_cannot_be_exported() -> None:
    e = TEACHERS["gcn-cora"]
    with pytest.raises(UsageError, match="student"):
        e.export_module(e.build(e.recipe), e.forms[0])  # type: ignore[misc]


@pytest.mark.parametrize("name", ["mlp-cora", "glnn-cora", "ffg2m-citeseer"])
def test_student_exports_with_parity(name: str, planetoid_dir: Path, cache: object,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _tiny(name)
    data = load_dataset(entry.dataset, planetoid_dir)
    module, metrics, art, hit = load_trained(entry, cache, data=data, progress=False)  # type: ignore[arg-type]
    assert not hit and 0.0 < metrics["test_accuracy"] <= 1.0
    if entry.recipe["mode"] != "mlp":
        assert metrics["teacher_test_accuracy"] > 0.5  # the cached teacher was trained and used
    exp, _ = export_module(module, entry.input_shape, cache, art.key, check_inputs=data.x_test)  # type: ignore[arg-type]
    parity = exp.meta["parity"]
    assert parity["samples"] == 1000 and parity["max_rel"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    # The deployed model is features-only: input 1 x F.
    m = onnx.load(str(exp.payload))
    assert m.graph.input[0].type.tensor_type.shape.dim[1].dim_value == data.x_all.shape[1]


@pytest.mark.slow
def test_default_recipes_meet_targets(planetoid_dir: Path, cache: object) -> None:
    for ds, (t_min, s_min) in {"cora": (0.80, 0.75), "citeseer": (0.69, 0.68)}.items():
        data = load_dataset(ds, planetoid_dir)
        acc = {m: load_trained(E[f"{m}-{ds}"], cache, data=data, progress=False)[1]["test_accuracy"]  # type: ignore[arg-type]
               for m in ("gcn", "glnn", "ffg2m")}
        assert acc["gcn"] >= t_min and acc["glnn"] >= s_min and acc["ffg2m"] >= acc["glnn"], acc
