from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.fixtures.models import small_mlp
from toolchain.core.errors import UsageError
from toolchain.core.onnx_io import fix_batch, input_specs, load_onnx


def test_truncated_file_is_a_usage_error(tmp_path: Path) -> None:
    f = tmp_path / "m.onnx"
    data = small_mlp().SerializeToString()
    f.write_bytes(data[: len(data) // 3])
    with pytest.raises(UsageError, match=r"not a valid ONNX model|empty ONNX|checker"):
        load_onnx(f)


def test_garbage_file_is_a_usage_error(tmp_path: Path) -> None:
    f = tmp_path / "m.onnx"
    f.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(UsageError):
        load_onnx(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")


def _with_external(tmp_path: Path, location: str) -> Path:
    m = small_mlp()
    w = m.graph.initializer[0]
    arr = numpy_helper.to_array(w)
    (tmp_path / "sub").mkdir(exist_ok=True)
    target = (tmp_path / "sub" / location) if not location.startswith("/") else Path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(arr.tobytes())
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(arr.nbytes))):
        e = w.external_data.add()
        e.key, e.value = k, v
    f = tmp_path / "sub" / "m.onnx"
    f.write_bytes(m.SerializeToString())
    return f


def test_external_data_inside_folder_loads(tmp_path: Path) -> None:
    m = load_onnx(_with_external(tmp_path, "weights.bin"))
    assert numpy_helper.to_array(m.graph.initializer[0]).shape == (784, 64)


def test_external_data_escaping_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="outside the model's folder"):
        load_onnx(_with_external(tmp_path, "../escape.bin"))
    with pytest.raises(UsageError, match="outside the model's folder"):
        load_onnx(_with_external(tmp_path, str(tmp_path / "abs.bin")))


def test_fix_batch_and_specs() -> None:
    m = fix_batch(small_mlp(), 1)
    (spec,) = input_specs(m)
    assert spec.shape == (1, 784) and spec.dtype == "float32"
    assert input_specs(small_mlp(), batch=7)[0].shape == (7, 784)
    np.testing.assert_equal(len(m.graph.node), len(small_mlp().graph.node))
