"""Shared training loop for classifiers on (x, y) arrays, with a progress bar and a time budget, and
the helpers recipes share: a training-set limit for tests' tiny recipes, one intra-op thread."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from toolchain.zoo import TrainContext


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global RNG, for any numpy code a recipe calls


def limited_context(ctx: TrainContext, recipe: Mapping[str, Any]) -> TrainContext:
    """Train on the first ``train_limit`` samples when the recipe says so (tests' tiny recipes)."""
    limit = recipe.get("train_limit")
    if not limit:
        return ctx
    d = ctx.data
    return dataclasses.replace(ctx, data=dataclasses.replace(d, x_train=d.x_train[:limit], y_train=d.y_train[:limit]))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Train with one intra-op thread: these small batch-128 matmuls gain little from a second
    thread, and on a shared 2-core machine oversubscription made steps 3-6x slower (measured)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(torch.from_numpy(x[i : i + batch]))
        correct += int((logits.argmax(-1).numpy() == y[i : i + batch]).sum())
    return correct / max(len(x), 1)


def train_classifier(
    model: nn.Module,
    ctx: TrainContext,
    *,
    epochs: int,
    lr: float,
    batch: int = 128,
    weight_decay: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    desc: str = "train",
) -> dict[str, Any]:
    """Adam + cosine schedule over ``epochs``; ``on_step(global_step)`` runs after each optimizer step."""
    seed_everything(ctx.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = ctx.data
    xtr, ytr = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(xtr) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = loss_fn or nn.functional.cross_entropy
    g = torch.Generator().manual_seed(ctx.seed)
    start = time.monotonic()
    step = 0
    stopped_early = False
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=None if ctx.progress else True, unit="step",
               leave=False)
    for _epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step(step)
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if ctx.max_seconds is not None and time.monotonic() - start > ctx.max_seconds:
                stopped_early = True
                break
        if stopped_early:
            break
    bar.close()
    acc = evaluate(model, data.x_test, data.y_test)
    return {
        "test_accuracy": acc,
        "epochs": epochs,
        "steps": step,
        "train_seconds": round(time.monotonic() - start, 1),
        "stopped_early": stopped_early,
    }
