"""S-KAN: every node selects its activation space from a pool of bases (layers, recipe, zoo entries).

Three phases (``train_skan``):

1. gated full training: each input node i of a layer is expanded in EVERY basis b of the pool,
   with coefficients for every basis, and its bases are mixed by a softmax gate
   g_i = softmax(a_i / tau). The temperature tau anneals geometrically from ``tau_start`` to
   ``tau_end`` over this phase, so the net converges to ONE basis per node while it trains and
   its other weights adapt to that choice. The coefficients learn on the training images; the gate
   logits a learn (every ``gate_every`` steps, own Adam) ONLY on the last ``select_holdout``
   training images, held out from the coefficients' updates (first-order DARTS): a node's gate
   then follows the basis that serves held-out data, not the one that fits the training set fastest
   (trained on the training loss, the gates chose ~60 % B-spline, the weakest single basis, and the
   pruned net ended at 0.892 against 0.900 for FastKAN trained as long);
2. selection: each node keeps its gate's argmax (``choice`` buffer, saved with the weights); the
   chosen basis's gate value is folded into its coefficients and the pruned bases' mean
   contribution on the held-out training slice (never the test set) into the bias;
3. pruning: the other bases' coefficients are zeroed and no longer computed, and the net is
   fine-tuned on the whole training set with only the chosen bases (same cost per step as a
   single-basis KAN).

Selection rules tried before, measured on the same full-pool net (seed 0, 4 epochs, held-out slice of
4096 training images, 0.900 accuracy before selection): (a) the first-order importance
E|dL/dy . c_ib| of an ungated pool sent ~75 % of nodes to Chebyshev and dropped to 0.848 before
fine-tuning (0.891 after, below FastKAN); (b) per-node ablation, "loss when node i keeps only basis
b", chose well node by node but dropped to 0.360 when every node was pruned at once: an ungated pool
co-adapts its bases (their contributions partly cancel), so no per-node score can predict the joint
pruning. Gating removes that co-adaptation before the choice is made.

``frozen()`` then builds the export form, which gathers each basis's nodes with a constant index
and expands them in that basis only: the ONNX graph contains only the chosen bases.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.kan_bases import RBFBasis, expand, make_basis
from toolchain.zoo.training import evaluate, limited_context, single_thread, train_classifier

POOL = ("bspline", "rbf", "cheby")

# Gaussian-RBF variants for a pool whose members are each competitive with FastKAN's RBF: the same
# 8 Gaussians, on another interval of the LayerNorm-ed input (centers evenly spaced over it) and/or
# with another width (FastKAN: width = center spacing; factor > 1: smoother, overlapping bumps).
# Defined here, not in kan_bases (that would retrain every KAN family). Each describes itself as an
# "rbf" basis (centers + inv_width), the form the fused TVM KAN kernel reads.
RBF_VARIANTS: dict[str, tuple[tuple[float, float], float]] = {  # name: (grid range, width factor)
    "rbf": ((-2.0, 2.0), 1.0),  # FastKAN's
    "rbf_narrow": ((-1.5, 1.5), 1.0),
    "rbf_wide": ((-3.0, 3.0), 1.0),
    "rbf_low": ((-2.5, 1.5), 1.0),
    "rbf_high": ((-1.5, 2.5), 1.0),
    "rbf_smooth": ((-2.0, 2.0), 1.5),
    "rbf_xsmooth": ((-2.0, 2.0), 2.0),
    "rbf_sharp": ((-2.0, 2.0), 0.67),
}


def skan_basis(name: str, num_basis: int) -> nn.Module:
    """A pool member: ``make_basis``'s bases plus the RBF variants of ``RBF_VARIANTS``."""
    if name in RBF_VARIANTS:
        grid_range, width = RBF_VARIANTS[name]
        basis = RBFBasis(num_centers=num_basis, grid_range=grid_range)
        basis.inv_width /= width  # a plain attribute that forward() reads
        return basis
    return make_basis(name, num_basis)


class SKANLayer(nn.Module):
    """A KAN layer over a pool of bases, gated per node, with a per-node basis choice (-1 until selection)."""

    def __init__(self, in_features: int, out_features: int, num_basis: int = 8,
                 pool: tuple[str, ...] = POOL) -> None:
        super().__init__()
        self.in_features, self.out_features, self.pool, self.num_basis = in_features, out_features, pool, num_basis
        # One input domain for the whole pool: LayerNorm puts nodes where every basis is expressive.
        self.norm = nn.LayerNorm(in_features)
        self.bases = nn.ModuleList(skan_basis(b, num_basis) for b in pool)
        # Equalise the bases' feature scale (RMS on N(0,1) input, i.e. LayerNorm-ed nodes): unscaled,
        # Chebyshev terms (RMS ~0.75) out-learned the local RBF / B-spline bumps (~0.3) under Adam.
        # Constants, folded into the weights by frozen().
        with torch.no_grad():
            z = torch.randn(8192, 1, generator=torch.Generator().manual_seed(0))
            self.feature_scale = [float(basis(z).pow(2).mean().rsqrt()) for basis in self.bases]
        std = 0.1 / in_features ** 0.5  # the gate's convex mix keeps the sum at one basis's scale
        self.coeff = nn.Parameter(torch.randn(len(pool), in_features * num_basis, out_features) * std)
        self.gate = nn.Parameter(torch.zeros(in_features, len(pool)))  # logits a_i; uniform at start
        self.tau = 1.0  # gate temperature, set by the training schedule (not a weight)
        self.base = nn.Linear(in_features, out_features)
        self.register_buffer("choice", torch.full((in_features,), -1, dtype=torch.long))

    @property
    def selected(self) -> bool:
        return bool((self.choice >= 0).all())

    def gates(self) -> torch.Tensor:
        """(in, pool) softmax gate per node at the current temperature."""
        return (self.gate / self.tau).softmax(-1)

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
            # Gate on the coefficient side ((in*K, out) rows), not on the (N, in, K) features: cheaper.
            g = self.gates().T.repeat_interleave(self.num_basis, dim=1)  # (pool, in*K)
            for b, basis in enumerate(self.bases):
                y = y + expand(basis, z) @ (self.coeff[b] * (g[b, :, None] * self.feature_scale[b]))
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
    def contributions(self, x: torch.Tensor, nodes: slice) -> torch.Tensor:
        """(pool, N, nodes, out): each basis's gated contribution to the layer output, for a slice of nodes."""
        z = self.norm(x)[:, nodes]
        g = self.gates()[nodes]  # (nodes, pool)
        w = self.coeff.view(len(self.pool), self.in_features, self.num_basis, self.out_features)[:, nodes]
        return torch.stack([torch.einsum("nik,iko->nio", basis(z) * self.feature_scale[b], w[b] * g[:, b, None, None])
                            for b, basis in enumerate(self.bases)])

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> None:
        """Keep each node's highest gate, fold that gate value into its coefficients and the pruned
        bases' mean contribution on ``x`` into the bias (a constant the net relied on), prune the rest."""
        if self.selected:
            return
        choice = self.gate.argmax(1)
        drop = 1 - F.one_hot(choice, len(self.pool)).T.to(torch.float32)  # (pool, in)
        for i in range(0, self.in_features, 64):
            c = self.contributions(x, slice(i, i + 64)).mean(1)  # (pool, nodes, out)
            self.base.bias += (c * drop[:, i:i + 64, None]).sum((0, 1))
        self.coeff.mul_(self.gates().T.repeat_interleave(self.num_basis, dim=1)[:, :, None])
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
            bases.append(skan_basis(name, k))
            w = layer.coeff[b].detach().view(layer.in_features, k, layer.out_features)[idx] * layer.feature_scale[b]
            weights.append(w.reshape(-1, layer.out_features))
        self.bases = nn.ModuleList(bases)
        self.register_buffer("weight", torch.cat(weights, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)
        feats = [expand(basis, z.index_select(1, getattr(self, f"idx_{name}")))
                 for name, basis in zip(self.kinds, self.bases, strict=True)]
        return self.base(F.silu(x)) + torch.cat(feats, 1) @ self.weight


class SKANNet(nn.Module):
    """784 -> hidden... -> 10 S-KAN."""

    def __init__(self, widths: list[int], num_basis: int, pool: tuple[str, ...] = POOL) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SKANLayer(a, b, num_basis, pool) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def set_temperature(self, tau: float) -> None:
        for layer in self.layers:
            layer.tau = tau

    @torch.no_grad()
    def gate_confidence(self) -> float:
        """Mean largest gate value over all nodes (1.0: every node already uses a single basis)."""
        return float(torch.cat([layer.gates().max(1).values for layer in self.layers]).mean())

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> None:
        """Choose every layer's bases in order; each layer's bias fold sees the pruned layers before it."""
        was = self.training
        self.eval()
        for layer in self.layers:
            layer.select(x)
            x = layer(x)
        self.train(was)

    def frozen(self) -> nn.Module:
        return nn.Sequential(*[layer.frozen() for layer in self.layers]).eval()


def build_skan(recipe: Mapping[str, Any]) -> nn.Module:
    net = SKANNet([784, *recipe["hidden"], 10], recipe["num_basis"], tuple(recipe["pool"]))
    with torch.no_grad():  # optional prior toward one basis: gate logits start at +prior for it
        for name, prior in recipe.get("gate_prior", {}).items():
            for layer in net.layers:
                layer.gate[:, layer.pool.index(name)] += prior
    return net


def _split(ctx: TrainContext, holdout: int) -> tuple[TrainContext, torch.Tensor, torch.Tensor]:
    """(context training on all but the last ``holdout`` training images, held-out x, held-out y)."""
    d = ctx.data
    if not 0 < holdout < len(d.x_train):
        raise ValueError(f"select_holdout={holdout} must be between 0 and the {len(d.x_train)} training images")
    fit = dataclasses.replace(d, x_train=d.x_train[:-holdout], y_train=d.y_train[:-holdout])
    return (dataclasses.replace(ctx, data=fit), torch.from_numpy(d.x_train[-holdout:]),
            torch.from_numpy(d.y_train[-holdout:]))


def train_skan(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Gated full-pool training (without the held-out slice) with an annealed gate temperature,
    selection, then fine-tuning of the pruned net on the whole training set."""
    assert isinstance(model, SKANNet)
    ctx = limited_context(ctx, recipe)
    common = {"lr": recipe["lr"], "batch": recipe["batch"]}
    with single_thread():
        fit_ctx, x_sel, y_sel = _split(ctx, recipe["select_holdout"])
        total = recipe["epochs_full"] * math.ceil(len(fit_ctx.data.x_train) / recipe["batch"])
        t_start, t_end = recipe["tau_start"], recipe["tau_end"]

        def anneal(step: int) -> None:  # geometric: the same relative sharpening every step
            model.set_temperature(t_start * (t_end / t_start) ** min(step / total, 1.0))

        gates = [layer.gate for layer in model.layers]
        gate_opt = torch.optim.Adam(gates, lr=recipe["gate_lr"])
        pick = torch.Generator().manual_seed(ctx.seed)

        def step_hook(step: int) -> None:
            anneal(step)
            if step % recipe["gate_every"]:
                return
            idx = torch.randint(len(x_sel), (recipe["batch"],), generator=pick)
            for g in gates:
                g.requires_grad_(True)
            loss = F.cross_entropy(model(x_sel[idx]), y_sel[idx])
            for g, grad in zip(gates, torch.autograd.grad(loss, gates), strict=True):
                g.grad = grad
            gate_opt.step()
            for g in gates:  # frozen again: the training-set optimizer (it holds them too) skips them
                g.grad = None
                g.requires_grad_(False)

        model.set_temperature(t_start)
        for g in gates:
            g.requires_grad_(False)
        full = train_classifier(model, fit_ctx, epochs=recipe["epochs_full"], desc="skan full", on_step=step_hook,
                                **common)
        for g in gates:
            g.requires_grad_(True)
        confidence = model.gate_confidence()
        holdout_full = evaluate(model, x_sel.numpy(), y_sel.numpy())
        t0 = time.monotonic()
        model.select(x_sel)
        select_seconds = time.monotonic() - t0
        selected_acc = evaluate(model, ctx.data.x_test, ctx.data.y_test)
        holdout_selected = evaluate(model, x_sel.numpy(), y_sel.numpy())
        tuned = train_classifier(model, ctx, epochs=recipe["epochs_prune"], desc="skan pruned", **common)
    pruned_params = sum(int(layer.node_mask().sum()) * layer.out_features for layer in model.layers) + sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith(("coeff", "gate")))  # gates: training only
    return {
        "test_accuracy": tuned["test_accuracy"],
        "full_pool_accuracy": full["test_accuracy"],
        "selected_untuned_accuracy": selected_acc,
        "holdout_accuracy_full_pool": holdout_full,
        "holdout_accuracy_selected": holdout_selected,
        "gate_confidence": round(confidence, 4),
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


# 2 full-pool + 10 pruned epochs (12: kan-fast-long's budget) and gate logits starting +1 toward RBF
# (FastKAN's basis, the best single basis at equal epochs), so a node leaves RBF only when the held-out
# gate gradient says so (uniform gates sent a third of the nodes to B-spline, the weakest basis).
# Validation accuracy (scripts/skan_validate.py: 50k/10k split of the TRAIN set), seeds 0-5, vs
# kan-fast-long (12 epochs) .9013 .9024 .9019 .9001 .9006 .9013 (mean .9013):
#   this recipe                      .9000 .9034 .9008 .9029 .9017 .9017 (mean .9018, wins 4/6 seeds)
#   pools of RBF variants (RBF_VARIANTS), uniform gates, 2+10 epochs:
#   rbf, rbf_smooth                  .9013 .9018 .9035 .9004 .9001 .9012 (mean .9014)
#   rbf, rbf_wide, rbf_narrow        .9021 .9017 .9027 .9000 .8988 .8980 (mean .9005); 4+8: .9032 .8996
#   rbf, rbf_high, rbf_narrow        .9004 .8994 .8997 .8985             (mean .8995)
#   rbf, rbf_smooth, rbf_sharp       .8962 .8978 .9017                   (mean .8986)
#   single members through this same pipeline, seed 0: rbf .9045 (seed 1: .8965), rbf_smooth .9018,
#   rbf_high .8999, rbf_xsmooth .8955.
# The variants are interchangeable (the gates split nodes ~30/30/40 % among them) and every pool lies
# within +-0.1 pt of FastKAN, below the seed-to-seed spread (0.23 pt for kan-fast-long, 0.8 pt for the
# rbf-only pipeline): no pool beats FastKAN at equal budget beyond noise, so the recipe is unchanged.
SKAN_RECIPE = {"hidden": [64], "num_basis": 8, "epochs_full": 2, "epochs_prune": 10, "select_holdout": 4096,
               "selection": "gate-heldout", "tau_start": 1.0, "tau_end": 0.02, "gate_lr": 4e-3, "gate_every": 2,
               "gate_prior": {"rbf": 1.0}, "lr": 2e-3, "batch": 128}


def _skan_entry(name: str, pool: tuple[str, ...]) -> ZooEntry:
    return ZooEntry(name=name, family="kan",
                    summary=f"S-KAN 784-64-10: per-node basis chosen from {{{', '.join(pool)}}}, pruned, frozen",
                    dataset="fashion-mnist", input_shape=(1, 784), recipe={**SKAN_RECIPE, "pool": list(pool)},
                    build=build_skan, train=train_skan, export_module=_skan_export, tags=("kan",))


ENTRIES = (
    _skan_entry("skan", ("bspline", "rbf", "cheby")),
    _skan_entry("skan-local", ("bspline", "rbf")),
)
