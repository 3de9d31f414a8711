"""Models edgec did not make, written here with seeded random weights and exported the ways users' files arrive:
legacy opset 9 with every initializer listed as a graph input and IR version 3, a static batch, and opset 18 with a
dynamic batch. Run in a child process (torch export) by the foreign-model tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

SIZE = 64  # image side: small, so convolutions compile fast untuned


class Basic(nn.Module):
    """ResNet basic block: two 3x3 convs + batch norms, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks, global pool, fc) at a quarter of the width."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, cout in enumerate([width, width * 2, width * 4, width * 8]):
            layers += [Basic(cin, cout, 1 if i == 0 else 2), Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.use_res else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 1), InvertedResidual(16, 24, 2, 6),
                                    InvertedResidual(24, 24, 1, 6), InvertedResidual(24, 32, 2, 6),
                                    InvertedResidual(32, 32, 1, 6))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, expand, 1)
        self.e3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      Fire(32, 8, 32), Fire(64, 8, 32), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      Fire(64, 16, 64))
        self.head = nn.Sequential(nn.Conv2d(128, classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.head(self.features(x)), 1)


class Encoder(nn.Module):
    """One pre-norm transformer encoder block over 16 tokens of width 32, written out (attention as matmuls)."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 16) -> None:
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).chunk(3, -1)
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.n2(x))
        return self.head(x.mean(1))


class GruNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.fc(out[:, -1])


class TwoInputs(nn.Module):
    """An image and a side vector, joined before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.side = nn.Linear(6, 8)
        self.fc = nn.Linear(16, 5)

    def forward(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(img)).mean((2, 3))
        return self.fc(torch.cat([a, torch.tanh(self.side(vec))], 1))


MODELS: dict[str, tuple[Any, list[tuple[int, ...]]]] = {
    "resnet18": (ResNet18, [(1, 3, SIZE, SIZE)]),
    "mobilenetv2": (MobileNetV2, [(1, 3, SIZE, SIZE)]),
    "squeezenet": (SqueezeNet, [(1, 3, SIZE, SIZE)]),
    "encoder": (Encoder, [(1, 16, 32)]),
    "gru": (GruNet, [(1, 12, 8)]),
    "two-inputs": (TwoInputs, [(1, 3, 32, 32), (1, 6)]),
}
STYLES = ("legacy-ir3", "static", "dynamic")


def make(name: str, style: str, out: Path) -> Path:
    """Export MODELS[name] in ``style`` to ``out`` (seeded weights: the same file every time)."""
    cls, shapes = MODELS[name]
    torch.manual_seed(0)
    module = cls().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    example = tuple(torch.randn(s) for s in shapes)
    names = [f"input{i}" for i in range(len(shapes))]
    if style == "legacy-ir3":
        torch.onnx.export(module, example, str(out), dynamo=False, opset_version=9, keep_initializers_as_inputs=True,
                          input_names=names, output_names=["out"])
        m = onnx.load(str(out))
        m.ir_version = 3
        onnx.save(m, str(out))
    elif style == "static":
        torch.onnx.export(module, example, str(out), dynamo=False, opset_version=13, input_names=names,
                          output_names=["out"])
    else:
        torch.onnx.export(module, example, str(out), dynamo=True, opset_version=18, external_data=False,
                          input_names=names, output_names=["out"],
                          dynamic_shapes=tuple({0: torch.export.Dim("batch", min=1, max=1024)} for _ in shapes))
    return out


if __name__ == "__main__":  # python -m tests.security.foreign_models OUT_DIR NAME:STYLE ...
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    for item in sys.argv[2:]:
        n, s = item.split(":")
        make(n, s, Path(sys.argv[1]) / f"{n}-{s}.onnx")
