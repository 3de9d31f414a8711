"""The zoo's import rules: datasets import no model family; project modules are imported at module level."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import toolchain.zoo

ZOO = Path(toolchain.zoo.__file__).parent
PROJECT = ("toolchain", "targets", "kernels")


def _imports(tree: ast.AST) -> Iterator[tuple[ast.stmt, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node, node.module
            yield from ((node, f"{node.module}.{a.name}") for a in node.names)


def test_datasets_import_only_the_core_and_each_other() -> None:
    files = sorted((ZOO / "datasets").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "planetoid.py", "subsets.py"}
    for f in files:
        for _node, name in _imports(ast.parse(f.read_text())):
            if name.startswith("toolchain.") and name != "toolchain.zoo":
                assert name.startswith(("toolchain.core", "toolchain.zoo.datasets")), f"{f.name} imports {name}"


def test_zoo_imports_project_modules_at_module_level() -> None:
    for f in sorted(ZOO.rglob("*.py")):
        tree = ast.parse(f.read_text())
        module_level = [*tree.body, *(s for n in tree.body if isinstance(n, ast.If) for s in n.body)]
        top = {id(s) for s in module_level}  # the module body and its `if TYPE_CHECKING:` blocks
        for node, name in _imports(tree):
            if name.split(".")[0] in PROJECT:
                assert id(node) in top, f"{f.relative_to(ZOO)}:{node.lineno} imports {name} inside a function"
