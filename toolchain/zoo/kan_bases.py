"""KAN basis expansions and layers, written so torch.onnx (dynamo) exports them to plain ops.

Every basis maps ``x`` of shape (B, n) to (B, n, K) with a static K, so a KAN layer is
``basis(x).reshape(B, n*K) @ W`` (a MatMul, no Einsum) plus an optional SiLU base branch.

- B-spline (efficient-kan): Cox-de Boor recursion unrolled for the static order k; the interval
  indicator is a boolean cast to float; the uniform grid is a frozen buffer (never updated).
- Gaussian RBF (FastKAN): exp(-((x - c) / h)^2) on LayerNorm-ed input.
- Chebyshev (ChebyKAN): T_n by the recurrence T_n = 2x T_{n-1} - T_{n-2} on tanh(x): no Acos/Cos.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class BSplineBasis(nn.Module):
    """Order-k B-splines on a uniform grid of G intervals over ``grid_range`` (G + k functions)."""

    def __init__(self, grid_size: int = 5, order: int = 3, grid_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        self.grid_size, self.order, self.grid_range = grid_size, order, grid_range
        h = (grid_range[1] - grid_range[0]) / grid_size
        knots = torch.arange(-order, grid_size + order + 1, dtype=torch.float32) * h + grid_range[0]
        self.register_buffer("grid", knots)  # frozen: a plain buffer, no grid updates

    @property
    def num_basis(self) -> int:
        return self.grid_size + self.order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, x = self.grid, x.unsqueeze(-1)
        bases = ((x >= g[:-1]) & (x < g[1:])).to(x.dtype)  # boolean interval mask cast to float
        for j in range(1, self.order + 1):  # unrolled: static order
            left = (x - g[: -(j + 1)]) / (g[j:-1] - g[: -(j + 1)])
            right = (g[j + 1 :] - x) / (g[j + 1 :] - g[1:-j])
            bases = left * bases[..., :-1] + right * bases[..., 1:]
        return bases


class RBFBasis(nn.Module):
    """Gaussian radial basis functions at evenly spaced centers (FastKAN)."""

    def __init__(self, num_centers: int = 8, grid_range: tuple[float, float] = (-2.0, 2.0)) -> None:
        super().__init__()
        self.register_buffer("centers", torch.linspace(grid_range[0], grid_range[1], num_centers))
        self.inv_width = (num_centers - 1) / (grid_range[1] - grid_range[0])

    @property
    def num_basis(self) -> int:
        return len(self.centers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x.unsqueeze(-1) - self.centers) * self.inv_width
        return torch.exp(-(d * d))  # d*d, not Pow: cheaper in every runtime


class ChebyBasis(nn.Module):
    """Chebyshev polynomials T_0..T_D of tanh(x), by recurrence."""

    def __init__(self, degree: int = 7) -> None:
        super().__init__()
        self.degree = degree

    @property
    def num_basis(self) -> int:
        return self.degree + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x)
        terms = [torch.ones_like(t), t]
        for _ in range(2, self.degree + 1):
            terms.append(2 * t * terms[-1] - terms[-2])
        return torch.stack(terms[: self.degree + 1], dim=-1)


def make_basis(kind: str, num_basis: int) -> nn.Module:
    """A basis of ``kind`` with ``num_basis`` functions (bspline: grid G = num_basis - 3, order 3)."""
    if kind == "bspline":
        return BSplineBasis(grid_size=num_basis - 3, order=3)
    if kind == "rbf":
        return RBFBasis(num_centers=num_basis)
    if kind == "cheby":
        return ChebyBasis(degree=num_basis - 1)
    raise ValueError(f"basis must be bspline, rbf or cheby, not {kind!r}")


def expand(basis: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, n) -> (B, n*K): the feature matrix a KAN layer multiplies by its coefficients."""
    return basis(x).flatten(1)


class KANLayer(nn.Module):
    """Shared shape of the three single-basis KAN layers: spline branch (+ SiLU base branch)."""

    kind = ""

    def __init__(self, in_features: int, out_features: int, basis: nn.Module, *, base: bool, norm: bool,
                 spline_std: float) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.norm = nn.LayerNorm(in_features) if norm else None
        self.basis = basis
        k = basis.num_basis
        # Coefficients laid out (in*K, out) so the layer is one MatMul after a reshape.
        self.spline_weight = nn.Parameter(torch.randn(in_features * k, out_features) * spline_std)
        self.base = nn.Linear(in_features, out_features) if base else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x) if self.norm is not None else x
        y = expand(self.basis, z) @ self.spline_weight
        if self.base is not None:
            y = y + self.base(F.silu(x))
        return y


class BSplineKANLayer(KANLayer):
    """efficient-kan: SiLU base branch + B-spline branch (grid G, order k)."""

    kind = "bspline"

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, order: int = 3) -> None:
        super().__init__(in_features, out_features, BSplineBasis(grid_size, order), base=True, norm=False,
                         spline_std=0.1 / math.sqrt(in_features))


class FastKANLayer(KANLayer):
    """FastKAN: Gaussian RBFs on LayerNorm-ed input + SiLU base branch."""

    kind = "rbf"

    def __init__(self, in_features: int, out_features: int, num_centers: int = 8) -> None:
        super().__init__(in_features, out_features, RBFBasis(num_centers), base=True, norm=True,
                         spline_std=0.1 / math.sqrt(in_features))


class ChebyKANLayer(KANLayer):
    """ChebyKAN: Chebyshev coefficients on tanh(x), no base branch (as the reference implementation)."""

    kind = "cheby"

    def __init__(self, in_features: int, out_features: int, degree: int = 7) -> None:
        super().__init__(in_features, out_features, ChebyBasis(degree), base=False, norm=False,
                         spline_std=1.0 / math.sqrt(in_features * (degree + 1)))

