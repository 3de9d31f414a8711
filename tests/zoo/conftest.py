"""Zoo tests train small models on a shared 2-core machine: one intra-op thread for every test here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A second intra-op thread made these small models' steps several times slower (measured)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
