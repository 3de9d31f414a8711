"""S-KAN: every node selects its activation space from a pool of bases.

Three phases (driven by ``toolchain.zoo.kan.train_skan``):

1. full training: each input node of a layer is expanded in EVERY basis of the pool, and every
   edge has coefficients for every basis;
2. selection: for node i and basis b, the first-order (Taylor) importance of that basis's
   centred contribution c_ib = (phi_b(x_i) - E phi_b(x_i)) @ W_b[i] to the loss, E_x |dL/dy . c_ib|,
   on training data (per selection batch); each
   node keeps its most important basis (``choice`` buffer, saved with the weights). (Contribution
   variance alone was tried first: it picked Chebyshev for every node, whose terms span the whole
   input range, and lost accuracy.)
3. pruning: the other bases' coefficients are zeroed and no longer computed, and the net is
   fine-tuned with only the chosen bases (same cost per step as a single-basis KAN).

``frozen()`` then builds the export form, which gathers each basis's nodes with a constant index
and expands them in that basis only: the ONNX graph contains only the chosen bases.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from toolchain.zoo.kan_bases import expand, make_basis

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
    def apply_choice(self, scores: torch.Tensor) -> None:
        """Keep each node's best-scoring basis and prune the others' coefficients."""
        self.choice.copy_(scores.argmax(0))
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

    def select(self, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> list[torch.Tensor]:
        """Score every (node, basis) on labelled data with the full pool, then choose and prune."""
        was = self.training
        self.eval()
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
        for s, layer in zip(scores, self.layers, strict=True):
            layer.apply_choice(s)
        self.train(was)
        return scores

    def frozen(self) -> nn.Module:
        return nn.Sequential(*[layer.frozen() for layer in self.layers]).eval()
