"""Models edgec did not make (tests/security/foreign_models.py: ResNet-18-style, MobileNetV2-style, SqueezeNet,
a transformer encoder block, a GRU, a two-input model; seeded random weights), exported the ways users' files
arrive (legacy opset 9 with initializers as inputs and IR version 3, a static batch, opset 18 with a dynamic batch),
go through ``edgec build`` on ort and tvm untuned: every target agrees with ONNX Runtime to 1e-4 (relative to the
output's scale), and the model edgec imported computes what the original file computes on ONNX Runtime. TVM 0.27
has no GRU: that build is a one-line exit 2 naming the op, and the ort build of it agrees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.security.edgec_cli import REPO, edgec, one_line_error
from tests.security.foreign_models import MODELS, STYLES
from toolchain.core.cache import Cache
from toolchain.core.onnx_io import load_onnx, ort_session
from toolchain.export import export_module

# One architecture per export style in the default tier (each style and each architecture at least once).
DEFAULT = [("resnet18", "legacy-ir3"), ("mobilenetv2", "static"), ("squeezenet", "dynamic"),
           ("encoder", "legacy-ir3"), ("gru", "static"), ("two-inputs", "legacy-ir3")]
REST = [(m, s) for m in MODELS for s in STYLES if (m, s) not in DEFAULT]
TVM_LACKS = {"gru": "GRU"}  # TVM 0.27's Relax ONNX frontend has no converter for it


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("foreign")


def _exported(workdir: Path, name: str, style: str, group: list[tuple[str, str]]) -> Path:
    """The exported file; the first case of ``group`` exports every file of the group in one child process
    (torch starts once)."""
    f = workdir / f"{name}-{style}.onnx"
    if not f.exists():
        todo = {c for c in group if not (workdir / f"{c[0]}-{c[1]}.onnx").exists()} | {(name, style)}
        subprocess.run([sys.executable, "-m", "tests.security.foreign_models", str(workdir),
                        *sorted(f"{n}:{s}" for n, s in todo)], check=True, cwd=REPO, capture_output=True, timeout=900)
    return f


def _ort_outputs(model: onnx.ModelProto | Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    sess = ort_session(model if isinstance(model, onnx.ModelProto) else model.read_bytes())
    return [sess.run(None, f)[0] for f in feeds]


def _feeds(path: Path, n: int = 4) -> list[dict[str, np.ndarray]]:
    """``n`` seeded batch-1 feeds for the original file's real inputs (not its initializers listed as inputs)."""
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    rng = np.random.default_rng(7)
    feeds = []
    for _ in range(n):
        feed = {}
        for vi in m.graph.input:
            if vi.name in inits:
                continue
            shape = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
            feed[vi.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def _build(f: Path, cache: Path, targets: list[str]) -> subprocess.CompletedProcess[str]:
    # a legacy file also goes through the cleanup pass (it once left initializers' graph inputs behind)
    passes = ["--pass", "cleanup"] if "legacy" in f.name else []
    return edgec(["build", str(f), "--profile", "x86-avx512", *[a for t in targets for a in ("--target", t)],
                  *passes, "--tune-trials", "0", "--samples", "16", "--duration", "0.1", "--json"], cache,
                 timeout=900)


def _check(workdir: Path, name: str, style: str, group: list[tuple[str, str]]) -> None:
    f = _exported(workdir, name, style, group)
    cache = workdir / "cache"
    targets = ["ort", "tvm"]
    r = _build(f, cache, targets)
    if name in TVM_LACKS:
        line = one_line_error(r, 2)
        assert "tvm" in line and TVM_LACKS[name] in line, line
        targets = ["ort"]
        r = _build(f, cache, targets)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    for t in targets:
        agreement = report["targets"][t]["agreement"]
        assert agreement["nonfinite"] == 0 and agreement["max_rel"] <= 1e-4, (t, agreement)
        assert agreement["argmax_agreement"] == 1.0, (t, agreement)
    imported_art = Cache(cache).get(report["onnx"]["artifact"])
    assert imported_art is not None
    imported = onnx.load(str(imported_art.payload))
    inits = {t.name for t in imported.graph.initializer}
    assert not [vi.name for vi in imported.graph.input if vi.name in inits], "initializers still listed as inputs"
    assert imported.ir_version >= 4
    feeds = _feeds(f)
    for want, got in zip(_ort_outputs(f, feeds), _ort_outputs(imported, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "style"), DEFAULT, ids=[f"{n}-{s}" for n, s in DEFAULT])
def test_foreign_model_builds_and_agrees(workdir: Path, name: str, style: str) -> None:
    _check(workdir, name, style, DEFAULT)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "style"), REST, ids=[f"{n}-{s}" for n, s in REST])
def test_foreign_model_builds_and_agrees_every_style(workdir: Path, name: str, style: str) -> None:
    _check(workdir, name, style, REST)


def test_legacy_file_is_normalized_on_import(tmp_path: Path) -> None:
    """An IR-3 file listing its initializers as inputs: loaded, it lists only real inputs at IR version >= 4."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], np.ones(8, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "legacy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    f = tmp_path / "legacy.onnx"
    onnx.save(model, f)
    loaded = load_onnx(f)
    assert [vi.name for vi in loaded.graph.input] == ["x"]
    assert loaded.ir_version == 4
    out = ort_session(loaded).run(None, {"x": np.ones((1, 4), np.float32)})[0]
    np.testing.assert_array_equal(out, np.full((1, 2), 4.0, np.float32))


class _BatchOneTraced(torch.nn.Module):
    """A third-party style layer that traces batch 1 into the graph (reshape(1, -1)): the export has a fixed batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, -1))


def test_static_batch_export_is_checked_sample_by_sample(tmp_path: Path) -> None:
    """The factory path's parity feeds 64 inputs: a fixed-batch export is checked one sample at a time."""
    torch.manual_seed(0)
    art, hit = export_module(_BatchOneTraced(), (1, 3, 4), Cache(tmp_path / "cache"), "batch-one-traced")
    assert not hit
    model = onnx.load(str(art.payload))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the batch is fixed
    parity = art.meta["parity"]
    assert parity["samples"] == 64 and parity["max_rel"] <= 1e-5, parity
