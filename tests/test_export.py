from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from toolchain import api
from toolchain.core.cache import Cache
from toolchain.core.errors import UsageError
from toolchain.core.onnx_io import load_onnx
from toolchain.export import export_model, run_ort


def test_factory_with_weights_only_checkpoint(tmp_path: Path, cache: Cache) -> None:
    from tests.fixtures.userpkg.nets import make_net

    net = make_net()
    torch.nn.init.normal_(net[0].weight, std=0.5)
    ckpt = tmp_path / "w.pt"
    torch.save(net.state_dict(), ckpt)
    art, hit = export_model("tests.fixtures.userpkg.nets:make_net", cache, "1,784", weights=ckpt)
    assert not hit and art.meta["parity"]["max_rel"] <= 1e-4
    x = np.random.default_rng(0).standard_normal((4, 784)).astype(np.float32)
    got = run_ort(art.payload, [{load_onnx(art.payload).graph.input[0].name: x}])[0][0]
    np.testing.assert_allclose(got, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_in_checkpoint_are_refused(tmp_path: Path, cache: Cache) -> None:
    ckpt = tmp_path / "evil.pt"
    torch.save({"0.weight": _Evil()}, ckpt, pickle_module=pickle)
    with pytest.raises(UsageError, match="weights-only"):
        export_model("tests.fixtures.userpkg.nets:make_net", cache, "1,784", weights=ckpt)


def test_factory_needs_shape(cache: Cache) -> None:
    with pytest.raises(UsageError, match="--input-shape"):
        export_model("tests.fixtures.userpkg.nets:make_net", cache)
    with pytest.raises(UsageError, match="cannot import"):
        export_model("no_such_pkg.x:make", cache, "1,4")


def test_pt2_exported_program(tmp_path: Path, cache: Cache) -> None:
    from tests.fixtures.userpkg.nets import make_net

    ep = torch.export.export(make_net().eval(), (torch.zeros(1, 784),))
    f = tmp_path / "net.pt2"
    torch.export.save(ep, f)
    art, _ = export_model(str(f), cache)
    assert art.meta["parity"]["max_rel"] <= 1e-4


def test_zoo_default_model_on_real_data(session_cache: Cache, fashion) -> None:
    """mlp-small trains on Fashion-MNIST, exports with parity on the real test set, builds on both targets."""
    rep = api.build("mlp-small", profile="x86-avx512", targets=["ort", "tvm"], passes=["cleanup"],
                    cache=session_cache, samples=2000, duration_s=0.3, progress=False)
    assert rep["onnx"]["parity_vs_torch"]["max_rel"] <= 1e-4
    assert rep["onnx"]["parity_vs_torch"]["argmax_agreement"] == 1.0
    for t in ("ort", "tvm"):
        acc = rep["targets"][t]["accuracy"]
        assert acc["dataset"] == "fashion-mnist" and acc["samples"] == 2000
        assert acc["task_accuracy"] > 0.8
        assert abs(acc["task_accuracy"] - acc["reference_accuracy"]) < 1e-9
    rep2 = api.build("mlp-small", profile="x86-avx512", targets=["ort", "tvm"], passes=["cleanup"],
                     cache=session_cache, samples=100, duration_s=0.2, progress=False)
    assert all(rep2["cache_hits"].values())
    # build and bench measure through one timing path: the same latency fields, intervals and stability flag
    art = api.resolve_artifact(rep2["targets"]["tvm"]["artifact"], cache=session_cache)
    bench = api.bench(art, cache=session_cache, samples=50, duration_s=0.2)
    assert set(bench["latency"]) == set(rep2["targets"]["tvm"]["latency"])
    for lat in (bench["latency"], rep2["targets"]["tvm"]["latency"]):
        assert {"ci", "stable", "rounds", "warmup"} <= set(lat) and lat["ci"]["p50_ms"][0] <= lat["p50_ms"]
