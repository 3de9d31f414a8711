"""A .pt2 archive is a zip of JSON, raw tensors and (optionally) pickles: edgec must never let torch unpickle
or evaluate anything from it. Each hostile archive is a real ``torch.export.save`` archive with one member
patched to carry a payload that would create a marker file; ``edgec export`` must refuse it with exit 2, one
line, and the marker must not exist."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.security.edgec_cli import edgec, one_line_error
from toolchain.core.cache import Cache
from toolchain.core.errors import UsageError
from toolchain.export import _check_sym_expr


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * x.shape[0]


class _Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _saved_archive(path: Path, dynamic: bool = False) -> Path:
    torch.manual_seed(0)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    ep = torch.export.export(_Net().eval(), (torch.zeros(2, 8),), dynamic_shapes=shapes)
    torch.export.save(ep, path)
    return path


def _patched(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Rewrite the archive with ``edit`` applied to {member name without the root folder: bytes}."""
    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/")[0]
        members = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(f"{root}/{name}", data)
    return dst


def _torch_saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        cfg_name = "data/weights/model_weights_config.json"
        cfg = json.loads(m[cfg_name])
        entry = cfg["config"]["fc.weight"]
        entry["use_pickle"] = True
        m["data/weights/" + entry["path_name"]] = _torch_saved(_Payload(marker))
        m[cfg_name] = json.dumps(cfg).encode()
    return edit


def _pickled_sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        m["data/sample_inputs/model.pt"] = _torch_saved(((_Payload(marker),), {}))
    return edit


def _opaque_constant(marker: Path) -> Callable[[dict[str, bytes]], None]:
    import pickle

    def edit(m: dict[str, bytes]) -> None:
        cfg_name = "data/constants/model_constants_config.json"
        cfg = json.loads(m[cfg_name])
        cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                 "tensor_meta": None}
        m["data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))
        m[cfg_name] = json.dumps(cfg).encode()
    return edit


def _guard_code(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        prog = json.loads(m["models/model.json"])
        prog["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
        m["models/model.json"] = json.dumps(prog).encode()
    return edit


def _sym_expr(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        text = m["models/model.json"].decode()
        start = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', start)
        evil = f"__import__('os').system('touch {marker}') or Symbol('s77', positive=True, integer=True)"
        m["models/model.json"] = (text[:start] + evil.replace("'", "\\u0027") + text[end:]).encode()
    return edit


def _foreign_call(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """A node that calls ``torch.load`` instead of an ATen operator."""
    def edit(m: dict[str, bytes]) -> None:
        prog = json.loads(m["models/model.json"])
        node = next(n for n in prog["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten.relu"))
        node["target"] = "torch.load"
        m["models/model.json"] = json.dumps(prog).encode()
    return edit


CASES = {
    "pickled-weight": (_pickled_weight, False, "pickled"),
    "pickled-sample-inputs": (_pickled_sample_inputs, False, "sample inputs"),
    "opaque-constant": (_opaque_constant, False, "opaque"),
    "guard-code": (_guard_code, True, None),
    "symbolic-expression": (_sym_expr, True, "symbolic shape"),
    "foreign-call": (_foreign_call, False, "not an ATen"),
}


@pytest.fixture(scope="module")
def saved_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Real torch.export.save archives, static and with a dynamic batch (symbolic shapes), made once."""
    d = tmp_path_factory.mktemp("pt2")
    return {dynamic: _saved_archive(d / f"net-{dynamic}.pt2", dynamic) for dynamic in (False, True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_pt2_runs_nothing(tmp_path: Path, saved_archives: dict[bool, Path], case: str) -> None:
    make_edit, dynamic, says = CASES[case]
    marker = tmp_path / "PAYLOAD-RAN"
    bad = _patched(saved_archives[dynamic], tmp_path / "bad.pt2", make_edit(marker))
    r = edgec(["export", str(bad), "-o", str(tmp_path / "out.onnx"), "--json"], tmp_path / "cache")
    assert not marker.exists(), f"the payload ran ({case})"
    cache = Cache(tmp_path / "cache")
    if says is None:  # guard code is dropped, not refused: the program itself is fine and exports
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["artifact"] and (tmp_path / "out.onnx").is_file()
        assert all(a is not None and cache.verify(a) for a in map(cache.artifact_at, cache.entry_dirs()))
        return
    line = one_line_error(r, 2)
    assert says in line and "bad.pt2" in line, line
    assert cache.entry_dirs() == [], "a refused archive left an entry in the cache"


def test_not_an_archive_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "junk.pt2"
    f.write_bytes(b"PK\x03\x04" + os.urandom(300))
    line = one_line_error(edgec(["export", str(f), "-o", str(tmp_path / "o.onnx")], tmp_path / "cache"), 2)
    assert "junk.pt2" in line


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "exec", "Integer(eval)", "getattr(s0, '__class__')", "s0.__class__",
    "9**9**9", "Symbol('a b')", "[1][0]", "lambda: 1", "Symbol('s0', **{'positive': True})",
])
def test_symbolic_expression_allowlist_refuses(expr: str) -> None:
    """torch evaluates these strings with sympify (eval): anything beyond srepr shape arithmetic is refused."""
    with pytest.raises(UsageError, match="not plain shape arithmetic"):
        _check_sym_expr(expr, Path("net.pt2"))


@pytest.mark.parametrize("expr", [
    "Symbol('s77', positive=True, integer=True)",
    "Add(FloorDiv(Symbol('s77', positive=True, integer=True), Integer(2)), Integer(1))",
    "Max(Symbol('s0', positive=True, integer=True), Integer(1))", "s0 + 2*s1",
])
def test_symbolic_expression_allowlist_accepts_shape_arithmetic(expr: str) -> None:
    _check_sym_expr(expr, Path("net.pt2"))
