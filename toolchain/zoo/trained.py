"""Trained weights as cached artifacts.

The key of an entry's weights is (model name, recipe, dataset content hash, seed, training-code digest).
The training-code digest covers what defines the model and how it trains, not where that code lives:

- start from the entry's ``build`` and ``train`` functions;
- follow every global (and closure variable) those functions use: a function or class defined in the zoo
  (``toolchain.zoo.*``) is followed in turn (a class with its zoo base classes and every method), a zoo
  ``ZooEntry`` contributes its recipe and its own ``build``/``train`` (a student's teacher, NN-Factory's
  supernet), a plain-data constant (numbers, strings, tuples/lists/dicts of them) its value;
- hash the source text of each function and class reached (``inspect.getsource``, parsed and unparsed, so
  comments, docstrings and formatting do not count), sorted, plus the constants' values.

So editing S-KAN's layer retrains S-KAN and not the spiking nets; editing the shared training loop retrains
every entry that uses it; moving code to another file or renaming a file retrains nothing (renaming a function
or class does: its name is part of its source). A nested entry's recipe counts as it is stored, even where the
outer recipe overrides it (a student's ``teacher_recipe``): conservative, never stale. Code outside the zoo
(torch, numpy, the core layer) and this module's cache machinery are not followed: the torch version and the
toolchain version are part of every step key already. ``training_code(entry)`` lists what is hashed.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolchain.core.cache import Artifact, Cache, StepKey, canonical_json
from toolchain.core.errors import UsageError
from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.datasets import Dataset, load_dataset

_ZOO = "toolchain.zoo"
_PLAIN_DATA = (int, float, str, bool, bytes, type(None))


def load_state_dict_safely(path: Path) -> dict[str, Any]:
    """Weights only: never unpickle arbitrary objects from a checkpoint."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a file that is not a state dict
        raise UsageError(
            f"{path} is not a weights-only checkpoint ({type(e).__name__}); save it with torch.save(model.state_dict())"
        ) from None


def _is_plain_data(value: Any) -> bool:
    if isinstance(value, _PLAIN_DATA):
        return True
    if isinstance(value, tuple | list | frozenset | set):
        return all(_is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain_data(k) and _is_plain_data(v) for k, v in value.items())
    return False


def _canonical(value: Any) -> str:
    """repr with set members sorted, so the text does not depend on string hashing."""
    if isinstance(value, set | frozenset):
        return "{" + ", ".join(sorted(_canonical(v) for v in value)) + "}"
    if isinstance(value, tuple | list):
        return type(value).__name__ + "(" + ", ".join(_canonical(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_canonical(k)}: {_canonical(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _in_zoo_module(module: str) -> bool:
    return (module == _ZOO or module.startswith(_ZOO + ".")) and module != __name__


def _in_zoo(obj: Any) -> bool:
    return _in_zoo_module(getattr(obj, "__module__", None) or "")


def _normalised_source(obj: Any) -> str | None:
    """The object's source without comments, docstrings or formatting; None where there is no source."""
    try:
        text = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:  # e.g. a lambda cut out of a longer line
        return text
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def _code_names(code: types.CodeType) -> Iterator[str]:
    """Global and attribute names a code object and its nested functions, lambdas and comprehensions use."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def _function_references(fn: types.FunctionType) -> Iterator[tuple[str, Any]]:
    """(name, value) of the globals and closure variables a function uses."""
    names = set(_code_names(fn.__code__))
    scope = fn.__globals__
    for name in sorted(names):
        if name in scope:
            value = scope[name]
            yield name, value
            if isinstance(value, types.ModuleType) and _in_zoo_module(value.__name__):  # `kan_bases.make_basis`
                yield from ((f"{name}.{a}", getattr(value, a)) for a in sorted(names) if hasattr(value, a))
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        try:
            yield name, cell.cell_contents
        except ValueError:  # an empty cell
            continue


def _class_functions(cls: type) -> Iterator[types.FunctionType]:
    for attr in vars(cls).values():
        if isinstance(attr, staticmethod | classmethod):
            attr = attr.__func__
        if isinstance(attr, property):
            yield from (f for f in (attr.fget, attr.fset, attr.fdel) if isinstance(f, types.FunctionType))
        elif isinstance(attr, types.FunctionType):
            yield attr


def training_code(entry: ZooEntry) -> list[str]:
    """What keys ``entry``'s weights besides its data and seed: the normalised source of every zoo function
    and class its build/train reach, then its own and nested entries' recipes and the constants used (sorted)."""
    for fn in (entry.build, entry.train):
        if not isinstance(inspect.unwrap(fn), types.FunctionType):
            raise UsageError(f"zoo entry {entry.name}: build and train must be plain functions (their source keys "
                             f"the trained weights), not {type(fn).__name__}")
    sources: set[str] = set()
    constants: set[str] = set()
    seen: set[int] = set()
    methods: set[int] = set()  # functions defined in a class: the class's source covers their text
    todo: list[Any] = [entry]
    while todo:
        obj = todo.pop()
        if isinstance(obj, types.FunctionType):
            obj = inspect.unwrap(obj)  # a decorated function (torch.no_grad, contextmanager): the function written
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ZooEntry):
            constants.add(f"entry {obj.name} recipe {canonical_json(dict(obj.recipe))}")
            todo += [obj.build, obj.train]
        elif isinstance(obj, types.FunctionType | type) and _in_zoo(obj):
            text = _normalised_source(obj)
            if text is None:  # generated code (a dataclass's __init__): its class's source defines it
                continue
            if id(obj) not in methods:
                sources.add(text)
            if isinstance(obj, type):
                todo += [base for base in obj.__mro__[1:] if _in_zoo(base)]
                members = list(_class_functions(obj))
                methods.update(id(inspect.unwrap(f)) for f in members)
                todo += members
                continue
            for name, value in _function_references(obj):
                if _is_plain_data(value):
                    constants.add(f"{name} = {_canonical(value)}")
                else:
                    todo.append(value)
        elif isinstance(obj, dict):  # e.g. a table of teacher entries
            todo += list(obj.values())
        elif isinstance(obj, tuple | list):
            todo += list(obj)
    return [*sorted(sources), *sorted(constants)]


def training_code_digest(entry: ZooEntry) -> str:
    """sha256 of ``training_code(entry)`` (see the module docstring)."""
    h = hashlib.sha256()
    for text in training_code(entry):
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


def load_trained(
    entry: ZooEntry,
    cache: Cache,
    data_dir: Path | str | None = None,
    seed: int = 0,
    progress: bool = True,
    data: Dataset | None = None,
) -> tuple[Any, dict[str, Any], Artifact, bool]:
    """(module in eval mode, training metrics, weights artifact, cache hit). Weights an entry trains on
    (a teacher, a supernet) are loaded from, or trained into, the same ``cache``."""
    import torch

    data = data or load_dataset(entry.dataset, data_dir)
    sk = StepKey("train", (), {"model": entry.name, "recipe": dict(entry.recipe), "data": data.sha256, "seed": seed,
                               "code": training_code_digest(entry)})

    def write(d: Path) -> tuple[str, dict[str, Any]]:
        torch.manual_seed(seed)
        module = entry.build(entry.recipe)
        ctx = TrainContext(data=data, cache=cache, data_dir=Path(data_dir) if data_dir else None, seed=seed,
                           progress=progress)
        metrics = entry.train(module, ctx, entry.recipe)
        module.eval()
        torch.save(module.state_dict(), d / "weights.pt")
        (d / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        return "weights.pt", {"model": entry.name, "family": entry.family, "metrics": metrics}

    art, hit = cache.get_or_build(sk, "weights", write)
    module = entry.build(entry.recipe)
    module.load_state_dict(load_state_dict_safely(art.payload))
    module.eval()
    return module, dict(art.meta.get("metrics", {})), art, hit

