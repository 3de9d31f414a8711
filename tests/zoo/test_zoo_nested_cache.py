"""Entries that train on another entry's weights (GNN students on their teacher, NN-Factory models on the
supernet) load those weights through the cache their caller passed to load_trained, never the default one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from toolchain.core.cache import Cache
from toolchain.zoo import nnfactory as nf
from toolchain.zoo.datasets import Dataset, load_dataset
from toolchain.zoo.gnn_mlp import ENTRIES as GNN_ENTRIES
from toolchain.zoo.trained import load_trained

GNN = {e.name: e for e in GNN_ENTRIES}
NNF = {e.name: e for e in nf.ENTRIES}


def trained_models(root: Path) -> list[str]:
    """Model names of the trained-weight artifacts stored under a cache root."""
    return sorted(json.loads(m.read_text())["meta"].get("model", "") for m in root.glob("*/*/manifest.json")
                  if json.loads(m.read_text())["kind"] == "weights")


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Cache, Cache, Path]:
    """Two callers' caches and the directory $EDGEC_CACHE (the default cache) points at."""
    env = tmp_path / "default-cache"
    monkeypatch.setenv("EDGEC_CACHE", str(env))
    return Cache(tmp_path / "a"), Cache(tmp_path / "b"), env


def test_gnn_student_trains_its_teacher_into_the_callers_cache(planetoid_dir: Path,
                                                               caches: tuple[Cache, Cache, Path]) -> None:
    a, b, env = caches
    e = GNN["glnn-cora"]
    recipe = {**e.recipe, "epochs": 5, "teacher_recipe": {**e.recipe["teacher_recipe"], "epochs": 5}}
    student = dataclasses.replace(e, recipe=recipe)
    data = load_dataset("cora", planetoid_dir)
    for cache in (a, b):
        _m, metrics, _art, hit = load_trained(student, cache, data=data, progress=False)
        assert not hit and "teacher_test_accuracy" in metrics
        assert trained_models(cache.root) == ["gcn-cora", "glnn-cora"]
    assert trained_models(env) == []


def test_nnfactory_model_assembles_from_the_supernet_in_the_callers_cache(
        fashion: Dataset, caches: tuple[Cache, Cache, Path]) -> None:
    a, b, env = caches
    e = NNF["nnf-footwear-s50"]
    tiny_supernet = {**e.recipe["supernet_recipe"], "stem": 32, "expert": 8, "epochs": 1, "train_limit": 2000}
    model = dataclasses.replace(e, recipe={**e.recipe, "supernet_recipe": tiny_supernet})
    data = load_dataset(model.dataset)
    for cache in (a, b):
        _m, metrics, _art, hit = load_trained(model, cache, data=data, progress=False)
        assert not hit and metrics["params"] > 0
        assert trained_models(cache.root) == ["nnf-footwear-s50", "nnf-supernet"]
    assert trained_models(env) == []
