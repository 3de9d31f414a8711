"""Shared fixtures. Every test gets its own cache unless it asks for the session one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from toolchain.core.cache import Cache

REPO = Path(__file__).resolve().parents[1]
PLANETOID = REPO.parent / "shared" / "data" / "planetoid"
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    """One cache for the whole run, so tests share trained weights and compiled artifacts."""
    return Cache(tmp_path_factory.mktemp("edgec-cache"))


@pytest.fixture(scope="session")
def planetoid_dir() -> Path:
    if not (PLANETOID / "ind.cora.x").is_file():
        pytest.skip(f"Planetoid raw files not found at {PLANETOID}")
    return PLANETOID


@pytest.fixture(scope="session")
def fashion() -> object:
    if not FASHION.is_file():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    from toolchain.zoo.datasets import fashion_mnist

    return fashion_mnist()


@pytest.fixture(autouse=True)
def _isolated_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never touch the user's ~/.cache/edgec from tests.
    if "EDGEC_CACHE" not in os.environ or not os.environ["EDGEC_CACHE"].startswith(str(tmp_path)):
        monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "env-cache"))
