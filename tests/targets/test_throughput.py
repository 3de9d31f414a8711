"""build --batch N: each target also built for N inputs per call, its throughput measured beside batch 1."""

from __future__ import annotations

from pathlib import Path

import onnx

from tests.fixtures.models import small_cnn, small_mlp
from toolchain import api
from toolchain.core.cache import Cache


def test_build_reports_throughput_at_the_batch_asked_for(tmp_path: Path) -> None:
    f = tmp_path / "mlp.onnx"
    onnx.save(small_mlp(), f)  # dynamic batch
    cache = Cache(tmp_path / "c")
    rep = api.build(str(f), profile="x86-avx512", cache=cache, targets=["ort", "tvm"], samples=32,
                    duration_s=0.1, batch=8, progress=False)
    for t in ("ort", "tvm"):
        tp = rep["targets"][t]["throughput"]
        assert tp["batch"] == 8 and tp["items_per_s"] > 0 and tp["agreement"]["max_rel"] <= 1e-4
        assert tp["artifact"] != rep["targets"][t]["artifact"] or t == "ort"
    tvm_art = api.resolve_artifact(rep["targets"]["tvm"]["throughput"]["artifact"], cache=cache)
    assert tvm_art.meta["batch"] == 8 and tvm_art.meta["inputs"][0]["shape"] == [8, 784]
    # The batch-1 artifact is untouched: same key as a build without --batch.
    plain = api.build(str(f), profile="x86-avx512", cache=cache, targets=["tvm"], samples=32, duration_s=0.1,
                      progress=False)
    assert plain["targets"]["tvm"]["artifact"] == rep["targets"]["tvm"]["artifact"]
    assert plain["cache_hits"]["tvm"] and "throughput" not in plain["targets"]["tvm"]


def test_a_fixed_batch_model_says_why_it_has_no_throughput(tmp_path: Path) -> None:
    f = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), f)  # batch fixed at 1 in the graph
    rep = api.build(str(f), profile="x86-avx512", cache=Cache(tmp_path / "c"), targets=["ort"], samples=8,
                    duration_s=0.1, batch=4, progress=False)
    assert "fixed at 1" in rep["targets"]["ort"]["throughput"]["skipped"]
