"""A model with two inputs is evaluated on both (seeded random per input): the reference and every target see the
same pairs; a remote bench, whose protocol sends one input array, refuses it in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from toolchain.bench import LocalDevice, RpcFarm, prepare_job
from toolchain.core.cache import Cache
from toolchain.core.errors import UsageError
from toolchain.core.onnx_io import ort_session
from toolchain.core.profile import load_profile
from toolchain.device.protocol import RemoteSpec
from toolchain.export import import_onnx_file
from toolchain.pipeline import compile_artifact


def _two_inputs(path: Path) -> Path:
    """y = (a + 2 * b) @ w: the output depends on both inputs."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [6, 3], np.arange(18, dtype=np.float32) / 10)
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Mul", ["b", "two"], ["b2"]), helper.make_node("Add", ["a", "b2"], ["s"]),
             helper.make_node("MatMul", ["s", "w"], ["y"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 6]),
                                             helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w, two])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_two_input_model_is_benched_on_both_inputs(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    src, _ = import_onnx_file(_two_inputs(tmp_path / "two.onnx"), cache)
    profile = load_profile("x86-avx512")
    art, _ = compile_artifact(src, profile, "ort", cache)
    job = prepare_job(art, cache, profile=profile, duration_s=0.05, reference=src)
    assert [name for name, _, _ in job.more_inputs] == ["b"] and job.more_inputs[0][2].shape == (64, 6)
    a, b = job.x, job.more_inputs[0][2]
    assert not np.array_equal(a, b)  # each input has its own seeded values
    want = ort_session(src.payload).run(None, {"a": a, "b": b})[0]
    np.testing.assert_allclose(job.ref_out, want, rtol=1e-6)
    res = LocalDevice().run([job])[art.key]
    assert res["agreement"]["max_abs"] == 0.0 and res["agreement"]["samples"] == 64

    with pytest.raises(UsageError, match="2 inputs; remote benches take single-input models"):
        RpcFarm(RemoteSpec.parse("127.0.0.1:9", "x86-avx512", "token")).run([job])
