"""Trained weights as cached artifacts, keyed by (model name, recipe, data hash, seed, training code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolchain.core.cache import Artifact, Cache, StepKey
from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.datasets import Dataset, load_dataset

_ZOO = "toolchain.zoo"
_ZOO_DIR = Path(__file__).parent


def load_state_dict_safely(path: Path) -> dict[str, Any]:
    """Weights only: never unpickle arbitrary objects from a checkpoint."""
    import torch

    from toolchain.core.errors import UsageError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"{path} is not a weights-only checkpoint ({type(e).__name__}); save it with torch.save(model.state_dict())"
        ) from None


def _zoo_imports(path: Path) -> set[str]:
    """toolchain.zoo modules a source file imports (module level or inside functions)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(_ZOO + "."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith(_ZOO + "."):
                found.add(node.module)
            elif node.module == _ZOO:  # `from toolchain.zoo import kan_bases` names a module; a class is not one
                found.update(f"{_ZOO}.{a.name}" for a in node.names if (_ZOO_DIR / f"{a.name}.py").is_file())
    return found


def training_code_digest(entry: ZooEntry | None = None) -> str:
    """sha256 of the training code of one entry: its family module(s) and every zoo module they import,
    transitively (bases, training loop, datasets, the ZooEntry contract). Editing S-KAN retrains S-KAN, not
    the spiking nets; editing the shared training loop retrains everything that uses it. Without an entry:
    the whole zoo package."""
    import hashlib
    import importlib.util

    files: dict[str, Path] = {}
    if entry is None:
        files = {f.name: f for f in _ZOO_DIR.glob("*.py")}
    else:
        todo = [_ZOO] + sorted({entry.build.__module__, entry.train.__module__})
        while todo:
            mod = todo.pop()
            spec = importlib.util.find_spec(mod)
            origin = Path(spec.origin) if spec and spec.origin else None
            if mod in files or origin is None or not origin.is_file():
                continue
            files[mod] = origin
            todo.extend(sorted(_zoo_imports(origin) - files.keys()))
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(files[name].name.encode())
        h.update(files[name].read_bytes())
    return h.hexdigest()


def load_trained(
    entry: ZooEntry,
    cache: Cache,
    data_dir: Path | str | None = None,
    seed: int = 0,
    progress: bool = True,
    data: Dataset | None = None,
) -> tuple[Any, dict[str, Any], Artifact, bool]:
    """(module in eval mode, training metrics, weights artifact, cache hit)."""
    import torch

    data = data or load_dataset(entry.dataset, data_dir)
    sk = StepKey("train", (), {"model": entry.name, "recipe": dict(entry.recipe), "data": data.sha256, "seed": seed,
                               "code": training_code_digest(entry)})

    def write(d: Path) -> tuple[str, dict[str, Any]]:
        torch.manual_seed(seed)
        module = entry.build(entry.recipe)
        metrics = entry.train(module, TrainContext(data=data, seed=seed, progress=progress), entry.recipe)
        module.eval()
        torch.save(module.state_dict(), d / "weights.pt")
        (d / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        return "weights.pt", {"model": entry.name, "family": entry.family, "metrics": metrics}

    art, hit = cache.get_or_build(sk, "weights", write)
    module = entry.build(entry.recipe)
    module.load_state_dict(load_state_dict_safely(art.payload))
    module.eval()
    return module, dict(art.meta.get("metrics", {})), art, hit
