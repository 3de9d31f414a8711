"""NN-Factory on Fashion-MNIST: a modular supernet of pretrained modules and an assembler that
materialises one compact static model for a task (a subset of classes) and a sparsity budget.

Supernet: a shared stem (784 -> S) and one expert module per class group (S -> E -> the group's
classes), trained jointly on all ten classes with width sampling (sandwich rule: the full width, the
narrowest and a random width every step), so the leading units of every module are the most useful
ones. Assembly selects the experts whose group holds a task class, keeps only the task classes' output
rows, and sparsifies every selected module structurally to the widest prefix that fits the budget.
The result is a plain nn.Sequential of Linear/ReLU (expert layers stacked, the head block-diagonal):
no gating, no routing, no training, in milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from toolchain.core.cache import Cache
from toolchain.core.errors import UsageError
from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.trained import load_trained
from toolchain.zoo.training import evaluate, limited_context, seed_everything

# Confusable pairs share an expert: tops/shirts, pullover/coat, trouser/dress, sandal/sneaker, bag/boot.
GROUPS: tuple[tuple[int, ...], ...] = ((0, 6), (2, 4), (1, 3), (5, 7), (8, 9))
TASKS: dict[str, tuple[int, ...]] = {"tops": (0, 2, 4, 6), "footwear": (5, 7, 9), "mixed": (1, 3, 8)}
BUDGETS = (0.5, 0.75, 0.9)


class Supernet(nn.Module):
    """Stem + per-group experts; ``forward(x, w)`` runs the leading fraction ``w`` of every module."""

    def __init__(self, stem: int, expert: int, groups: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.groups = [tuple(g) for g in groups]
        self.stem = nn.Linear(784, stem)
        self.experts = nn.ModuleList(nn.Linear(stem, expert) for _ in self.groups)
        self.heads = nn.ModuleList(nn.Linear(expert, len(g)) for g in self.groups)
        self.order = [c for g in self.groups for c in g]  # head outputs in group order -> class ids

    def widths(self, w: float) -> tuple[int, int]:
        return max(1, math.ceil(w * self.stem.out_features)), max(1, math.ceil(w * self.experts[0].out_features))

    def forward(self, x: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        k, ke = self.widths(w)
        h = F.relu(F.linear(x, self.stem.weight[:k], self.stem.bias[:k]))
        outs = [F.linear(F.relu(F.linear(h, ex.weight[:ke, :k], ex.bias[:ke])), head.weight[:, :ke], head.bias)
                for ex, head in zip(self.experts, self.heads, strict=True)]
        logits = torch.cat(outs, -1)
        inv = torch.as_tensor(np.argsort(self.order))
        return logits[:, inv]  # class order 0..9


def build_supernet(recipe: Mapping[str, Any]) -> nn.Module:
    return Supernet(recipe["stem"], recipe["expert"], recipe["groups"])


def train_supernet(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Sandwich rule: full width (CE on labels) + narrowest + one random width (CE on the full width's soft labels)."""
    assert isinstance(model, Supernet)
    ctx = limited_context(ctx, recipe)
    seed_everything(ctx.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls on a shared 2-core machine: one thread is faster
    xtr, ytr = torch.from_numpy(ctx.data.x_train), torch.from_numpy(ctx.data.y_train)
    batch, epochs, wmin = recipe["batch"], recipe["epochs"], recipe["min_width"]
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    steps = epochs * ((len(xtr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(ctx.seed)
    start, step = time.monotonic(), 0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            xb, yb = xtr[idx], ytr[idx]
            w_rand = wmin + (1 - wmin) * float(torch.rand(1, generator=g))
            full = model(xb, 1.0)
            soft = F.softmax(full.detach(), -1)
            # Inplace distillation (slimmable nets): narrow widths learn the full width's soft labels.
            loss = F.cross_entropy(full, yb) + sum(F.cross_entropy(model(xb, w), soft) for w in (wmin, w_rand))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
            step += 1
    model.eval()
    accs = {f"test_accuracy_w{w}": evaluate(_Fixed(model, w), ctx.data.x_test, ctx.data.y_test)
            for w in (wmin, 0.25, 0.5)}
    torch.set_num_threads(threads)
    return {"test_accuracy": evaluate(model, ctx.data.x_test, ctx.data.y_test), **accs, "steps": step,
            "train_seconds": round(time.monotonic() - start, 1)}


class _Fixed(nn.Module):
    def __init__(self, net: Supernet, w: float) -> None:
        super().__init__()
        self.net, self.w = net, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.w)


def plan(net: Supernet, task: Sequence[int], sparsity: float) -> tuple[list[int], int, int, float]:
    """(selected group indices, stem width, expert width, width fraction) for a task and a parameter budget."""
    task = sorted({int(c) for c in task})
    if not task or any(c < 0 or c > 9 for c in task):
        raise UsageError(f"task classes {task} must be a non-empty subset of 0..9")
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"sparsity {sparsity} must be in [0, 1), e.g. 0.75")
    sel = [i for i, g in enumerate(net.groups) if set(g) & set(task)]

    def params(k: int, ke: int) -> int:
        return 784 * k + k + len(sel) * (k * ke + ke) + len(task) * (ke + 1)

    full = params(*net.widths(1.0))
    best = (*net.widths(1.0 / 256), 1.0 / 256)
    for i in range(1, 257):  # widest prefix on a 1/256 grid that fits the budget
        k, ke = net.widths(i / 256)
        if params(k, ke) <= (1 - sparsity) * full:
            best = (k, ke, i / 256)
    return sel, *best


def compact_module(n_in: int, k: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, k), nn.ReLU(), nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


@torch.no_grad()
def assemble_from(net: Supernet, task_classes: Sequence[int], sparsity: float) -> nn.Sequential:
    """Materialise the task model: stem prefix, selected experts stacked, head rows of the task classes."""
    task = sorted({int(c) for c in task_classes})
    sel, k, ke, _w = plan(net, task, sparsity)
    model = compact_module(784, k, len(sel) * ke, len(task))
    model[0].weight.copy_(net.stem.weight[:k])
    model[0].bias.copy_(net.stem.bias[:k])
    model[2].weight.copy_(torch.cat([net.experts[i].weight[:ke, :k] for i in sel]))
    model[2].bias.copy_(torch.cat([net.experts[i].bias[:ke] for i in sel]))
    head_w = torch.zeros(len(task), len(sel) * ke)  # block-diagonal: a class reads only its expert
    head_b = torch.zeros(len(task))
    for row, c in enumerate(task):
        j = next(j for j, i in enumerate(sel) if c in net.groups[i])
        gi = sel[j]
        r = net.groups[gi].index(c)
        head_w[row, j * ke : (j + 1) * ke] = net.heads[gi].weight[r, :ke]
        head_b[row] = net.heads[gi].bias[r]
    model[4].weight.copy_(head_w)
    model[4].bias.copy_(head_b)
    return model.eval()


def assemble(task_classes: Sequence[int], sparsity: float, net: Supernet) -> nn.Module:
    """The public assembler: one compact static nn.Module for ``task_classes`` at ``sparsity``, cut from
    ``net`` (e.g. ``load_supernet(cache)``)."""
    return assemble_from(net, task_classes, sparsity)


SUPERNET_RECIPE = {"stem": 256, "expert": 64, "groups": [list(g) for g in GROUPS], "epochs": 6, "lr": 2e-3,
                   "batch": 128, "min_width": 0.08}
SUPERNET_ENTRY = ZooEntry(
    name="nnf-supernet", family="nnfactory", dataset="fashion-mnist", input_shape=(1, 784),
    summary="NN-Factory supernet: stem 784-256 + 5 class-group experts 256-64-2, width-sampled training",
    recipe=SUPERNET_RECIPE, build=build_supernet, train=train_supernet,
)


def load_supernet(cache: Cache, recipe: Mapping[str, Any] = SUPERNET_RECIPE, *, data_dir: Path | None = None,
                  seed: int = 0, progress: bool = False) -> Supernet:
    """The supernet of ``recipe``, loaded from ``cache`` (trained into it on the first call)."""
    entry = dataclasses.replace(SUPERNET_ENTRY, recipe=dict(recipe))
    net, *_ = load_trained(entry, cache, data_dir, seed=seed, progress=progress)
    assert isinstance(net, Supernet)
    return net


def _generated_entry(task_name: str, sparsity: float) -> ZooEntry:
    task = TASKS[task_name]
    recipe = {"task": list(task), "sparsity": sparsity, "supernet_recipe": dict(SUPERNET_RECIPE)}

    def build(r: Mapping[str, Any]) -> nn.Module:
        sel, k, ke, _w = plan(build_supernet(r["supernet_recipe"]), r["task"], r["sparsity"])  # type: ignore[arg-type]
        return compact_module(784, k, len(sel) * ke, len(r["task"]))

    def train(model: nn.Module, ctx: TrainContext, r: Mapping[str, Any]) -> dict[str, Any]:
        # No training: materialise from the supernet of the recipe (in the caller's cache) and copy the weights in.
        sn = load_supernet(ctx.cache, r["supernet_recipe"], data_dir=ctx.data_dir, seed=ctx.seed,
                           progress=ctx.progress)
        t0 = time.perf_counter()
        gen = assemble_from(sn, r["task"], r["sparsity"])
        seconds = time.perf_counter() - t0
        model.load_state_dict(gen.state_dict())
        return {"test_accuracy": evaluate(model, ctx.data.x_test, ctx.data.y_test), "assemble_seconds": seconds,
                "params": sum(p.numel() for p in model.parameters())}

    return ZooEntry(
        name=f"nnf-{task_name}-s{int(sparsity * 100)}", family="nnfactory",
        dataset="fashion-mnist:" + ",".join(map(str, task)), input_shape=(1, 784),
        summary=f"NN-Factory model for classes {task} at {int(sparsity * 100)} % sparsity, assembled (no training)",
        recipe=recipe, build=build, train=train,
    )


ENTRIES = (SUPERNET_ENTRY, _generated_entry("tops", 0.75), _generated_entry("footwear", 0.5))
