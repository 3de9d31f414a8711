"""What TVM's ONNX importer is given: graphs users export, as exported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from targets import get_target
from targets.tvm.frontend import tvm_target
from toolchain import api
from toolchain.core.cache import Cache
from toolchain.core.onnx_io import ort_session
from toolchain.core.profile import load_profile
from toolchain.export import import_onnx_file


def chunked_projection() -> onnx.ModelProto:
    """A static-shape export whose Slice bounds are computed at run time, as torch exports ``qkv.chunk(3, -1)``:
    Shape -> Gather -> Div -> Slice, then a Reshape of the slice (the attention heads)."""
    c = helper.make_tensor
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "last"], ["width"], axis=0),
        helper.make_node("Div", ["width", "three"], ["third"]),
        helper.make_node("Slice", ["x", "zero", "third", "axis"], ["q"]),
        helper.make_node("Reshape", ["q", "heads"], ["y"]),
    ]
    inits = [c("last", TensorProto.INT64, [1], [2]), c("three", TensorProto.INT64, [1], [3]),
             c("zero", TensorProto.INT64, [1], [0]), c("axis", TensorProto.INT64, [1], [2]),
             c("heads", TensorProto.INT64, [4], [1, 16, 4, 8])]
    graph = helper.make_graph(nodes, "chunk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_run_time_shape_arithmetic_of_a_static_export_builds_for_tvm(tmp_path: Path) -> None:
    """Before: TVM imported the Slice as a dynamic_strided_slice of unknown shape and its constant folding died on
    the Reshape after it (exit 4, "emit_te now only supports Tensor that has ShapeExpr shape")."""
    path = tmp_path / "chunk.onnx"
    onnx.save(chunked_projection(), path)
    cache = Cache(tmp_path / "cache")
    src, _ = import_onnx_file(path, cache)
    art, _ = api.compile(src, profile="x86-avx512", target="tvm", cache=cache)
    x = np.random.default_rng(0).standard_normal((1, 16, 96)).astype(np.float32)
    with get_target("tvm").load(art) as runner:
        got = runner.infer({"x": x})[0]
    want = ort_session(path).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_x86_avx512_code_runs_on_zen4_and_ice_lake() -> None:
    """The x86-avx512 profile names Zen 4 and Ice Lake: LLVM must not use what only one of them has (SSE4a's
    extrq / insertq are AMD only, AVX512-BF16 is missing on Ice Lake), and keeps what both have."""
    from tvm.target import codegen

    target = tvm_target(load_profile("x86-avx512"))
    assert not codegen.llvm_cpu_has_features(["sse4a"], target)
    assert not codegen.llvm_cpu_has_features(["avx512bf16"], target)
    for feature in ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "fma", "bmi2"):
        assert codegen.llvm_cpu_has_features([feature], target), feature
