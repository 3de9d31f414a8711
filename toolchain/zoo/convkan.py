"""Conv-KAN: a per-channel basis expansion followed by a standard Conv2d.

Each input channel c becomes K channels phi_1(x_c)..phi_K(x_c) (Gaussian RBFs on a BatchNorm-ed
input) plus a SiLU(x_c) base channel; a Conv2d over those C*(K+1) channels then learns, per tap,
a learnable univariate function of each input channel: a KAN convolution kernel.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from toolchain.zoo.kan_bases import RBFBasis


class KANConv2d(nn.Module):
    """RBF expansion per channel + SiLU base channel -> Conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, num_centers: int = 6) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.norm = nn.BatchNorm2d(in_channels, affine=False)  # puts each channel on the RBF centers' range
        self.basis = RBFBasis(num_centers)
        self.conv = nn.Conv2d(in_channels * (num_centers + 1), out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        z = self.norm(x)
        # (B, C, H, W, K) -> (B, C, K, H, W) -> (B, C*K, H, W): channel-major like the Conv2d weight.
        phi = self.basis(z).permute(0, 1, 4, 2, 3).reshape(b, c * self.basis.num_basis, h, w)
        return self.conv(torch.cat([F.silu(x), phi], 1))


class ConvKANNet(nn.Module):
    """1x28x28 -> KANConv(8) -> pool -> KANConv(16) -> pool -> Linear(784 -> 10)."""

    def __init__(self, channels: tuple[int, int] = (8, 16), centers: tuple[int, int] = (8, 4)) -> None:
        super().__init__()
        c1, c2 = channels
        self.block1 = KANConv2d(1, c1, 3, centers[0])
        self.block2 = KANConv2d(c1, c2, 3, centers[1])
        self.head = nn.Linear(c2 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 28, 28)  # the trainer feeds flat 784 vectors; deployed input is 1x1x28x28
        x = F.max_pool2d(self.block1(x), 2)
        x = F.max_pool2d(self.block2(x), 2)
        return self.head(x.flatten(1))
