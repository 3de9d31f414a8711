"""S-KAN: every node selects its activation space from a pool of bases (layers, recipe, zoo entries).

Three phases (``train_skan``):

1. full training: each input node of a layer is expanded in EVERY basis of the pool, and every
   edge has coefficients for every basis; the last ``select_holdout`` training images are held out;
2. selection (``selection="ablation"``, default): on that held-out slice of the TRAINING set (never
   the test set), for every node i and basis b, the loss of the network when node i keeps only
   basis b (the other bases' contributions removed, their mean folded into the bias); each node
   keeps the basis with the lowest loss (``choice`` buffer, saved with the weights). Layers are
   selected in order, each with the already-pruned layers before it. The older first-order
   ``"taylor-centred"`` score (E|dL/dy . c_ib|) measures how much a basis is USED, not how well the
   node does with it alone: it sent ~75 % of nodes to Chebyshev and lost accuracy against FastKAN;
3. pruning: the other bases' coefficients are zeroed and no longer computed, and the net is
   fine-tuned on the whole training set with only the chosen bases (same cost per step as a
   single-basis KAN).

``frozen()`` then builds the export form, which gathers each basis's nodes with a constant index
and expands them in that basis only: the ONNX graph contains only the chosen bases.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.g2gnet import limited_context, single_thread
from toolchain.zoo.kan_bases import expand, make_basis
from toolchain.zoo.training import evaluate, train_classifier

POOL = ("bspline", "rbf", "cheby")


class SKANLayer(nn.Module):
    """A KAN layer over a pool of bases with a per-node basis choice (-1 until selection)."""

    edgec_kernel = "kan-select"

    def __init__(self, in_features: int, out_features: int, num_basis: int = 8,
                 pool: tuple[str, ...] = POOL) -> None:
        super().__init__()
        self.in_features, self.out_features, self.pool, self.num_basis = in_features, out_features, pool, num_basis
        # One input domain for the whole pool: LayerNorm puts nodes where every basis is expressive.
        self.norm = nn.LayerNorm(in_features)
        self.bases = nn.ModuleList(make_basis(b, num_basis) for b in pool)
        # Equalise the bases' feature scale (RMS on N(0,1) input, i.e. LayerNorm-ed nodes): unscaled,
        # Chebyshev terms (RMS ~0.75) out-learned the local RBF / B-spline bumps (~0.3) under Adam and
        # every node ended up choosing Chebyshev. Constants, folded into the weights by frozen().
        with torch.no_grad():
            z = torch.randn(8192, 1, generator=torch.Generator().manual_seed(0))
            self.feature_scale = [float(basis(z).pow(2).mean().rsqrt()) for basis in self.bases]
        std = 0.1 / (in_features * len(pool)) ** 0.5
        self.coeff = nn.Parameter(torch.randn(len(pool), in_features * num_basis, out_features) * std)
        self.base = nn.Linear(in_features, out_features)
        self.register_buffer("choice", torch.full((in_features,), -1, dtype=torch.long))

    @property
    def selected(self) -> bool:
        return bool((self.choice >= 0).all())

    def node_mask(self) -> torch.Tensor:
        """(pool, in*K) float mask of the coefficient rows each node keeps (all ones before selection)."""
        if not self.selected:
            return torch.ones(len(self.pool), self.in_features * self.num_basis)
        onehot = F.one_hot(self.choice, len(self.pool)).T.to(torch.float32)  # (pool, in)
        return onehot.repeat_interleave(self.num_basis, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)
        y = self.base(F.silu(x))
        if not self.selected:
            for b, basis in enumerate(self.bases):
                y = y + (expand(basis, z) @ self.coeff[b]) * self.feature_scale[b]
            return y
        # Pruned: each basis expands only its own nodes (training-time indices; export uses frozen()).
        feats, weights = [], []
        for b, basis in enumerate(self.bases):
            idx = (self.choice == b).nonzero().squeeze(1)
            if len(idx):
                feats.append(expand(basis, z.index_select(1, idx)))
                w = self.coeff[b].view(self.in_features, self.num_basis, self.out_features)
                weights.append(w.index_select(0, idx).reshape(-1, self.out_features) * self.feature_scale[b])
        return y + torch.cat(feats, 1) @ torch.cat(weights, 0)

    @torch.no_grad()
    def taylor_scores(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """(pool, in): sum over samples of |dL/dy . c_ib| for this batch (c_ib: basis b of node i)."""
        z = self.norm(x)
        scores = torch.empty(len(self.pool), self.in_features)
        for b, basis in enumerate(self.bases):
            phi = basis(z) * self.feature_scale[b]  # (N, in, K)
            # Centre: the constant part of an edge function (e.g. Chebyshev T_0) is a bias any basis
            # or the next layer absorbs; only the varying part says what the basis contributes.
            phi = phi - phi.mean(0)
            # dL/dy . (phi_i @ W_i) = phi_i . (W_i @ dL/dy): one MatMul instead of an (N, in, out) tensor
            gw = (grad_out @ self.coeff[b].T).view(len(x), self.in_features, self.num_basis)
            scores[b] = (phi * gw).sum(-1).abs().sum(0)
        return scores

    @torch.no_grad()
    def contributions(self, x: torch.Tensor, nodes: slice) -> torch.Tensor:
        """(pool, N, nodes, out): each basis's contribution c_ib to the layer output, for a slice of nodes."""
        z = self.norm(x)[:, nodes]
        w = self.coeff.view(len(self.pool), self.in_features, self.num_basis, self.out_features)[:, nodes]
        return torch.stack([torch.einsum("nik,iko->nio", basis(z) * self.feature_scale[b], w[b])
                            for b, basis in enumerate(self.bases)])

    @torch.no_grad()
    def apply_choice(self, scores: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Keep each node's best-scoring basis and prune the others' coefficients. With data ``x``, the
        mean contribution of the pruned (node, basis) pairs moves into the base bias: it is a constant
        the net relied on, not something the pruned basis expressed."""
        choice = scores.argmax(0)
        if x is not None:
            drop = 1 - F.one_hot(choice, len(self.pool)).T.to(torch.float32)  # (pool, in)
            for i in range(0, self.in_features, 64):
                c = self.contributions(x, slice(i, i + 64)).mean(1)  # (pool, nodes, out)
                self.base.bias += (c * drop[:, i:i + 64, None]).sum((0, 1))
        self.choice.copy_(choice)
        self.coeff.mul_(self.node_mask()[:, :, None])

    def frozen(self) -> FrozenSKANLayer:
        if not self.selected:
            raise ValueError("S-KAN layer has no basis choice yet: run selection before export")
        return FrozenSKANLayer(self)

    def choice_counts(self) -> dict[str, int]:
        return {name: int((self.choice == b).sum()) for b, name in enumerate(self.pool)}


class FrozenSKANLayer(nn.Module):
    """Export form: constant gathers per chosen basis, one MatMul over the concatenated features."""

    edgec_kernel = "kan-select"

    def __init__(self, layer: SKANLayer) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.norm = nn.LayerNorm(layer.in_features)
        self.norm.load_state_dict(layer.norm.state_dict())
        self.base = nn.Linear(layer.in_features, layer.out_features)
        self.base.load_state_dict(layer.base.state_dict())
        k = layer.num_basis
        self.kinds: list[str] = []
        bases, weights = [], []
        for b, name in enumerate(layer.pool):
            idx = (layer.choice == b).nonzero().squeeze(1)
            if len(idx) == 0:
                continue  # basis chosen by no node: absent from the graph
            self.kinds.append(name)
            self.register_buffer(f"idx_{name}", idx.clone())
            bases.append(make_basis(name, k))
            w = layer.coeff[b].detach().view(layer.in_features, k, layer.out_features)[idx] * layer.feature_scale[b]
            weights.append(w.reshape(-1, layer.out_features))
        self.bases = nn.ModuleList(bases)
        self.register_buffer("weight", torch.cat(weights, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)
        feats = [expand(basis, z.index_select(1, getattr(self, f"idx_{name}")))
                 for name, basis in zip(self.kinds, self.bases, strict=True)]
        return self.base(F.silu(x)) + torch.cat(feats, 1) @ self.weight

    def edgec_kernel_params(self) -> dict[str, Any]:
        return {"kind": "select", "in_features": self.in_features, "out_features": self.out_features,
                "layernorm": True, "base_branch": "silu",
                "bases": [{"nodes": getattr(self, f"idx_{n}").tolist(), **b.describe()}
                          for n, b in zip(self.kinds, self.bases, strict=True)]}


class SKANNet(nn.Module):
    """784 -> hidden... -> 10 S-KAN."""

    def __init__(self, widths: list[int], num_basis: int, pool: tuple[str, ...] = POOL) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SKANLayer(a, b, num_basis, pool) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def select(self, x: torch.Tensor, y: torch.Tensor, method: str = "ablation") -> list[torch.Tensor]:
        """Choose one basis per node on labelled held-out data, layer by layer, then prune.

        Returns the (pool, in) score of every layer (higher is better)."""
        if method not in ("ablation", "taylor-centred"):
            raise ValueError(f"S-KAN selection must be 'ablation' or 'taylor-centred', not {method!r}")
        was = self.training
        self.eval()
        if method == "taylor-centred":
            scores = self._taylor_scores(x, y)
            for s, layer in zip(scores, self.layers, strict=True):
                layer.apply_choice(s, x=None)
        else:
            scores, h = [], x
            for i, layer in enumerate(self.layers):
                scores.append(-self._ablation_losses(i, h, y))
                layer.apply_choice(scores[-1], x=h)
                with torch.no_grad():
                    h = layer(h)  # the next layer is selected behind this pruned one
        self.train(was)
        return scores

    @torch.no_grad()
    def _ablation_losses(self, i: int, h: torch.Tensor, y: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """(pool, in): mean cross-entropy when node j of layer i keeps only basis b (every other node of
        every layer unchanged; the removed bases' mean contribution kept as a constant)."""
        layer, rest = self.layers[i], self.layers[i + 1:]
        y_full = layer(h)  # (N, out)
        pool, n = len(layer.pool), len(h)
        losses = torch.empty(pool, layer.in_features)
        for j in range(0, layer.in_features, chunk):
            c = layer.contributions(h, slice(j, j + chunk))  # (pool, N, nodes, out)
            removed_all = c - c.mean(1, keepdim=True)  # centred: the mean stays as a bias
            total = removed_all.sum(0)
            for b in range(pool):
                out = (y_full[:, None, :] - (total - removed_all[b])).reshape(-1, layer.out_features)
                for nxt in rest:
                    out = nxt(out)
                ce = F.cross_entropy(out, y.repeat_interleave(c.shape[2]), reduction="none")
                losses[b, j:j + c.shape[2]] = ce.view(n, -1).mean(0)
        return losses

    def _taylor_scores(self, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> list[torch.Tensor]:
        scores = [torch.zeros(len(layer.pool), layer.in_features) for layer in self.layers]
        for i in range(0, len(x), batch):
            h, ins, outs = x[i:i + batch], [], []
            for layer in self.layers:
                ins.append(h.detach())
                h = layer(h)
                h.retain_grad()
                outs.append(h)
            F.cross_entropy(h, y[i:i + batch], reduction="sum").backward()
            for s, layer, inp, out in zip(scores, self.layers, ins, outs, strict=True):
                s += layer.taylor_scores(inp, out.grad)
        self.zero_grad(set_to_none=True)
        return scores

    def frozen(self) -> nn.Module:
        return nn.Sequential(*[layer.frozen() for layer in self.layers]).eval()


def build_skan(recipe: Mapping[str, Any]) -> nn.Module:
    return SKANNet([784, *recipe["hidden"], 10], recipe["num_basis"], tuple(recipe["pool"]))


def _split(ctx: TrainContext, holdout: int) -> tuple[TrainContext, torch.Tensor, torch.Tensor]:
    """(context training on all but the last ``holdout`` training images, held-out x, held-out y)."""
    d = ctx.data
    if not 0 < holdout < len(d.x_train):
        raise ValueError(f"select_holdout={holdout} must be between 0 and the {len(d.x_train)} training images")
    fit = dataclasses.replace(d, x_train=d.x_train[:-holdout], y_train=d.y_train[:-holdout])
    return (dataclasses.replace(ctx, data=fit), torch.from_numpy(d.x_train[-holdout:]),
            torch.from_numpy(d.y_train[-holdout:]))


def train_skan(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Full-pool training (without the held-out slice), per-node selection on the held-out slice of the
    training set, then fine-tuning of the pruned net on the whole training set."""
    assert isinstance(model, SKANNet)
    ctx = limited_context(ctx, recipe)
    common = {"lr": recipe["lr"], "batch": recipe["batch"]}
    with single_thread():
        fit_ctx, x_sel, y_sel = _split(ctx, recipe["select_holdout"])
        full = train_classifier(model, fit_ctx, epochs=recipe["epochs_full"], desc="skan full", **common)
        holdout_full = evaluate(model, x_sel.numpy(), y_sel.numpy())
        t0 = time.monotonic()
        model.select(x_sel, y_sel, recipe["selection"])
        select_seconds = time.monotonic() - t0
        selected_acc = evaluate(model, ctx.data.x_test, ctx.data.y_test)
        holdout_selected = evaluate(model, x_sel.numpy(), y_sel.numpy())
        tuned = train_classifier(model, ctx, epochs=recipe["epochs_prune"], desc="skan pruned",
                                 **{**common, "lr": recipe.get("lr_prune", recipe["lr"])})
    pruned_params = sum(int(layer.node_mask().sum()) * layer.out_features for layer in model.layers) + sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith("coeff"))
    return {
        "test_accuracy": tuned["test_accuracy"],
        "full_pool_accuracy": full["test_accuracy"],
        "selected_untuned_accuracy": selected_acc,
        "holdout_accuracy_full_pool": holdout_full,
        "holdout_accuracy_selected": holdout_selected,
        "epochs": recipe["epochs_full"] + recipe["epochs_prune"],
        "steps": full["steps"] + tuned["steps"],
        "train_seconds": round(full["train_seconds"] + select_seconds + tuned["train_seconds"], 1),
        "select_seconds": round(select_seconds, 1),
        "stopped_early": full["stopped_early"] or tuned["stopped_early"],
        "choices": [layer.choice_counts() for layer in model.layers],
        "params": pruned_params,
        "params_full_pool": sum(p.numel() for p in model.parameters()),
    }


def _skan_export(module: nn.Module, form: str) -> nn.Module:
    return module.frozen() if isinstance(module, SKANNet) else module


SKAN_RECIPE = {"hidden": [64], "num_basis": 8, "epochs_full": 4, "epochs_prune": 8, "select_holdout": 4096,
               "selection": "ablation", "lr": 2e-3, "batch": 128}


def _skan_entry(name: str, pool: tuple[str, ...]) -> ZooEntry:
    return ZooEntry(name=name, family="kan",
                    summary=f"S-KAN 784-64-10: per-node basis chosen from {{{', '.join(pool)}}}, pruned, frozen",
                    dataset="fashion-mnist", input_shape=(1, 784), recipe={**SKAN_RECIPE, "pool": list(pool)},
                    build=build_skan, train=train_skan, export_module=_skan_export, tags=("kan",))


ENTRIES = (
    _skan_entry("skan", ("bspline", "rbf", "cheby")),
    _skan_entry("skan-local", ("bspline", "rbf")),
)
