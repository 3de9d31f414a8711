"""Passes composed through toolchain.api.optimize and `edgec optimize`, and accuracy-controlled int8 on a
real (1-epoch) mlp-small trained on Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.fixtures.synthetic import g2g_masked_mlp
from toolchain import api
from toolchain.core.cache import Cache
from toolchain.export import import_onnx_file

REPO = Path(__file__).resolve().parents[2]


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture
def g2g_file(tmp_path: Path) -> Path:
    p = tmp_path / "g2g.onnx"
    onnx.save_model(g2g_masked_mlp((784, 256, 256, 10), groups=8, density=0.25, seed=1), p)
    return p


X = np.random.default_rng(0).random((16, 784)).astype(np.float32)


@pytest.mark.parametrize("chain", [
    ["cleanup", "modular", "int8"],
    ["modular", "cleanup", "fp16"],
    ["structured=keep=0.5", "prune=density=0.5", "int8"],
    ["prune=density=0.5", "nm", "modular", "fp16"],
    ["int8", "cleanup"],
])
def test_chains_through_api(chain: list[str], g2g_file: Path, cache: Cache) -> None:
    art, _ = import_onnx_file(g2g_file, cache)
    out, reports = api.optimize(art, chain, cache=cache)  # api runs onnx.checker full_check on every step
    assert [r["pass"] for r in reports] == [c.split("=")[0] for c in chain]
    got, ref = ort_run(out.payload, X), ort_run(g2g_file, X)
    assert got.shape == ref.shape and np.isfinite(got).all()
    if "prune=density=0.5" not in chain and "structured=keep=0.5" not in chain:  # lossless up to precision
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    again, rep2 = api.optimize(art, chain, cache=cache)
    assert again.key == out.key and all(r["cache_hit"] for r in rep2)


def edgec(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEC_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def test_cli_optimize_chain_and_only_if_faster(g2g_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    r = edgec(["optimize", str(g2g_file), "--pass", "modular", "--pass", "prune=density=0.5", "--only-if-faster",
               "-o", str(out), "--json"], tmp_path / "c")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["passes"]
    assert rep[0]["config"]["only_if_faster"] and rep[1]["config"]["only_if_faster"]
    for row in rep[1]["report"]["layers"]:  # unstructured zeros never pay on ort: kept dense unless measured faster
        assert row["applied"] == (row["speedup"] >= 1.05)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert np.allclose(ort_run(out, X), ort_run(g2g_file, X), rtol=1e-4, atol=1e-5) or any(
        row["applied"] for row in rep[1]["report"]["layers"])


def test_cli_unsuitable_models_say_so_in_one_line(tmp_path: Path) -> None:
    from onnx import helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "r",
                          [helper.make_tensor_value_info("x", 1, [1, 784])],
                          [helper.make_tensor_value_info("y", 1, [1, 784])])
    relu = tmp_path / "relu.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), relu)
    r = edgec(["optimize", str(relu), "--pass", "nm"], tmp_path / "c")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no MatMul/Gemm" in lines[0]
    mlp = tmp_path / "mlp.onnx"
    onnx.save_model(g2g_masked_mlp((784, 64, 10)), mlp)
    r = edgec(["optimize", str(mlp), "--pass", "int8=mode=static"], tmp_path / "c")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--data" in lines[0]
    r = edgec(["optimize", str(mlp), "--pass", "int8=mode=static,calib_samples=64", "--data", "fashion-mnist",
               "--json"], tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passes"][0]["report"]["calibration"]["samples"] == 64


@pytest.fixture(scope="module")
def mlp_small_1ep(session_cache: Cache, fashion):  # -> (artifact, cache)
    from toolchain.export import export_module
    from toolchain.zoo.registry import get_entry
    from toolchain.zoo.trained import load_trained

    cache = session_cache  # shares the 1-epoch weights with any other test that trains the same recipe
    entry = get_entry("mlp-small")
    entry = dataclasses.replace(entry, recipe={**entry.recipe, "epochs": 1})
    module, _, wart, _ = load_trained(entry, cache, progress=False, data=fashion)
    art, _ = export_module(module, entry.input_shape, cache, wart.key, check_inputs=fashion.x_test[:256],
                           extra_meta={"zoo": entry.name, "family": entry.family, "dataset": entry.dataset})
    return art, cache


def _acc(path: Path, ds) -> float:
    """Accuracy at batch 1, as deployed (dynamic int8 scales each call's activations)."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    pred = [s.run(None, {name: ds.x_test[i:i + 1]})[0].argmax() for i in range(len(ds.x_test))]
    return float((np.array(pred) == ds.y_test).mean() * 100)


def test_int8_auto_on_trained_mlp_small(mlp_small_1ep, fashion) -> None:
    art, cache = mlp_small_1ep
    out, reports = api.optimize(art, ["int8-auto"], cache=cache)  # the dataset comes from the artifact's meta
    rep = reports[0]["report"]
    assert rep["dataset"] == "fashion-mnist" and rep["eval_samples"] == 10000 and rep["within_bound"]
    base, acc = _acc(art.payload, fashion), _acc(out.payload, fashion)
    assert base - acc <= 1.0 and abs(acc / 100 - rep["accuracy"]) < 1e-5
    assert abs(base / 100 - rep["accuracy_fp32"]) < 1e-5
    assert base > 70  # a real model trained on real data
    assert rep["int8_layers"] >= 1 and "MatMulInteger" in {n.op_type for n in onnx.load(out.payload).graph.node}


def test_int8_auto_finds_and_keeps_an_int8_hostile_layer(mlp_small_1ep, fashion, tmp_path: Path) -> None:
    """Plant a hidden neuron with a constant 1e4 activation that the next layer ignores (zero weights): fp32
    outputs do not change, but int8 of the next layer (one activation scale per call) crushes every other
    input to zero. int8-auto must measure the sensitivities, keep exactly that layer in fp32, quantize the rest."""
    from onnx import numpy_helper

    art, cache = mlp_small_1ep
    m = onnx.load(art.payload)
    inits = {t.name: t for t in m.graph.initializer}
    fc0, fc1 = m.graph.node[0], m.graph.node[2]
    assert fc0.op_type == fc1.op_type == "Gemm"

    def edit(name: str, fn) -> None:
        a = numpy_helper.to_array(inits[name]).copy()
        fn(a)
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    edit(fc0.input[1], lambda a: a.__setitem__((0, slice(None)), 0.0))  # neuron 0 ignores the image...
    edit(fc0.input[2], lambda a: a.__setitem__(0, 1e4))  # ...and always outputs 1e4
    edit(fc1.input[1], lambda a: a.__setitem__((slice(None), 0), 0.0))  # the next layer ignores it
    f = tmp_path / "hostile.onnx"
    onnx.save_model(m, f)
    user_art, _ = import_onnx_file(f, cache)
    _, reports = api.optimize(user_art, ["int8-auto=eval_samples=2000"], cache=cache, data="fashion-mnist")
    rep = reports[0]["report"]
    rows = {r["layer"]: r for r in rep["layers"]}
    assert rep["evaluations"] > 1 and rep["within_bound"] and rep["drop_points"] <= 1.0
    assert rows[fc1.name]["precision"] == "fp32" and rows[fc1.name]["sensitivity_points"] > 5
    assert all(r["precision"] == "int8" for k, r in rows.items() if k != fc1.name)
    assert rep["int8_layers"] == len(rows) - 1
