"""Trained weights are keyed by what defines the model and its training, not by where that code lives."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from toolchain.zoo import mlp
from toolchain.zoo.gnn_mlp import ENTRIES as GNN_ENTRIES
from toolchain.zoo.trained import training_code, training_code_digest


def _copy_of_mlp_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                        edit: Callable[[str], str] = lambda s: s) -> ModuleType:
    """zoo/mlp.py's text (after ``edit``) imported from another file under another module name."""
    path = tmp_path / f"{name}.py"
    path.write_text(edit(Path(mlp.__file__).read_text()))
    spec = importlib.util.spec_from_file_location(f"toolchain.zoo.{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_moving_or_renaming_a_family_file_keeps_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moved = _copy_of_mlp_family(tmp_path, monkeypatch, "dense_baselines")
    assert moved.ENTRIES[0].build is not mlp.ENTRIES[0].build
    assert training_code_digest(moved.ENTRIES[0]) == training_code_digest(mlp.ENTRIES[0])


def test_comments_and_docstrings_do_not_count_but_code_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    same = _copy_of_mlp_family(tmp_path, monkeypatch, "mlp_commented", lambda s: s.replace(
        "    return nn.Sequential(*layers)", "    # a comment\n    return nn.Sequential(*layers)  # another").replace(
        '"""Plain dense MLP', '"""A reworded docstring. Plain dense MLP'))
    assert training_code_digest(same.ENTRIES[0]) == training_code_digest(mlp.ENTRIES[0])
    changed = _copy_of_mlp_family(tmp_path, monkeypatch, "mlp_gelu", lambda s: s.replace("nn.ReLU()", "nn.GELU()"))
    assert training_code_digest(changed.ENTRIES[0]) != training_code_digest(mlp.ENTRIES[0])


def test_the_key_covers_the_shared_loop_and_nested_entries_but_not_other_families() -> None:
    mlp_code = "\n".join(training_code(mlp.ENTRIES[0]))
    assert "def train_classifier(" in mlp_code and "def build_mlp(" in mlp_code  # the shared training loop
    assert "class GCN(" not in mlp_code and "class SpikingMLP(" not in mlp_code
    student = {e.name: e for e in GNN_ENTRIES}["glnn-cora"]
    student_code = "\n".join(training_code(student))
    assert "class GCN(" in student_code and "def train_teacher(" in student_code  # its teacher's definition
    assert "def load_trained(" not in student_code  # the cache machinery is not training code
