"""The model zoo: network families edgec deploys, each with a training recipe on real data.

A ``ZooEntry`` names a family member, its recipe (every hyper-parameter that keys the cached
weights), how to build the untrained module, and how to train it. The registry is one explicit
dict assembled in ``registry.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.core.cache import Cache
from toolchain.zoo.datasets import Dataset

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrainContext:
    data: Dataset
    # Where weights an entry trains on are loaded from or trained into (a GNN student's teacher, the
    # NN-Factory supernet): the cache the caller passed to load_trained, never a default one.
    cache: Cache
    data_dir: Path | None = None  # the caller's --data-dir, for datasets such nested weights train on
    seed: int = 0
    progress: bool = True
    max_seconds: float | None = None  # a recipe may stop early to honour a time budget


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    summary: str
    dataset: str  # name understood by toolchain.zoo.datasets.load_dataset
    input_shape: tuple[int, ...]  # batch-1 shape of the deployed model's input
    recipe: Mapping[str, Any]
    build: Callable[[Mapping[str, Any]], torch.nn.Module]
    train: Callable[[torch.nn.Module, TrainContext, Mapping[str, Any]], dict[str, Any]]
    # Export forms (e.g. "unrolled", "step" for spiking nets); the first is the default.
    forms: tuple[str, ...] = ("default",)
    # Returns the module to export for a form (e.g. a single-step cell); identity by default.
    export_module: Callable[[torch.nn.Module, str], torch.nn.Module] | None = None
    # Feed builder for a form: (module, x batch) -> tuple of example inputs. Default: (x,)
    example_inputs: Callable[[torch.nn.Module, str, torch.Tensor], tuple[Any, ...]] | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def deployable(self) -> bool:
        """False for training-time-only entries (the GNN teachers take the whole graph): nothing to deploy."""
        return "no-export" not in self.tags
