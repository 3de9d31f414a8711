"""S-KAN: every node selects its activation space from a pool of bases.

Three phases (driven by ``toolchain.zoo.kan.train_skan``):

1. full training: each input node of a layer is expanded in EVERY basis of the pool, and every
   edge has coefficients for every basis;
2. selection: for node i and basis b, score = Var_x[ phi_b(x_i) @ W_b[i] ] summed over the node's
   outgoing edges (the variance of what that basis contributes, measured on training data); each
   node keeps its best basis (``choice`` buffer, saved with the weights);
3. pruning: the other bases' coefficients are zeroed and masked, and the net is fine-tuned.

``frozen()`` then builds the export form, which gathers each basis's nodes with a constant index
and expands them in that basis only: the ONNX graph contains only the chosen bases.
"""

from __future__ import annotations

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
        mask = self.node_mask() if self.selected else None
        for b, basis in enumerate(self.bases):
            w = self.coeff[b] if mask is None else self.coeff[b] * mask[b, :, None]
            y = y + expand(basis, z) @ w
        return y

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Pick each node's basis by its contribution variance on ``x``; prune the rest. Returns scores."""
        z = self.norm(x)
        scores = torch.empty(len(self.pool), self.in_features)
        for b, basis in enumerate(self.bases):
            phi = basis(z)  # (N, in, K)
            phi = phi - phi.mean(0)
            cov = torch.einsum("nik,nil->ikl", phi, phi) / len(phi)  # training-only: einsum is fine here
            w = self.coeff[b].view(self.in_features, self.num_basis, self.out_features)
            scores[b] = (cov * (w @ w.transpose(1, 2))).sum((1, 2))
        self.choice.copy_(scores.argmax(0))
        self.coeff.mul_(self.node_mask()[:, :, None])  # prune: unchosen coefficients are gone
        return scores

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
            w = layer.coeff[b].detach().view(layer.in_features, k, layer.out_features)[idx]
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
        self.layers = nn.ModuleList(SKANLayer(a, b, num_basis, pool) for a, b in zip(widths[:-1], widths[1:],
                                                                                    strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> None:
        """Select every layer's bases, layer by layer, on the activations the data produces."""
        was = self.training
        self.eval()
        for layer in self.layers:
            layer.select(x)
            x = layer(x)
        self.train(was)

    def frozen(self) -> nn.Module:
        return nn.Sequential(*[layer.frozen() for layer in self.layers]).eval()
