"""Trained weights as cached artifacts, keyed by (model name, recipe, data hash, seed, training code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolchain.cache import Artifact, Cache, StepKey
from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.datasets import Dataset, load_dataset


def load_state_dict_safely(path: Path) -> dict[str, Any]:
    """Weights only: never unpickle arbitrary objects from a checkpoint."""
    import torch

    from toolchain.errors import UsageError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"{path} is not a weights-only checkpoint ({type(e).__name__}); save it with torch.save(model.state_dict())"
        ) from None


def training_code_digest() -> str:
    """sha256 of the zoo package's sources: editing a family, its layers or the training loop must retrain.

    Coarse on purpose: per-family digests would miss shared helpers (bases, training loop, datasets)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
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
                               "code": training_code_digest()})

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
