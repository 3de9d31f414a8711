"""User and environment errors end as exit 2 (the input is wrong) or 3 (the environment is), with one line that
names the file and the fix: never exit 4 "internal error", never a torch log on stderr. Read-only cases run as
nobody (root ignores permissions); the full disk is a small tmpfs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from targets.tvm.database import RECORDS, WORKLOADS, open_database
from tests.fixtures.models import small_mlp
from tests.security.edgec_cli import REPO, edgec, one_line_error
from toolchain.cli.common import emit  # noqa: TID251 -- the test of the CLI's JSON writer
from toolchain.device.runtime import DeviceServer


@pytest.fixture
def model(tmp_path: Path) -> Path:
    f = tmp_path / "mlp.onnx"
    onnx.save(small_mlp(dims=(16, 8, 4)), f)
    return f


def test_opset_from_the_future(tmp_path: Path) -> None:
    m = small_mlp(dims=(16, 8, 4))
    m.opset_import[0].version = 99
    f = tmp_path / "future.onnx"
    onnx.save(m, f)
    r = edgec(["compile", str(f), "--profile", "x86-avx512", "--target", "ort"], tmp_path / "cache")
    line = one_line_error(r, 2)
    assert "opset 99" in line and "future.onnx" in line


def test_bit_flip_in_an_op_name(tmp_path: Path) -> None:
    """An op type that is no longer UTF-8: the checker raised UnicodeDecodeError."""
    data = bytearray(small_mlp(dims=(16, 8, 4)).SerializeToString())
    data[data.find(b"MatMul") + 1] = 0xFF
    f = tmp_path / "flipped.onnx"
    f.write_bytes(bytes(data))
    line = one_line_error(edgec(["inspect", str(f)], tmp_path / "cache"), 2)
    assert "flipped.onnx" in line


def test_external_data_past_the_end(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    f = d / "mlp.onnx"
    onnx.save(small_mlp(dims=(16, 8, 4)), f, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    data = d / "weights.bin"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    line = one_line_error(edgec(["inspect", str(f)], tmp_path / "cache"), 2)
    assert "weights.bin" in line and "past the end" in line


def test_output_is_a_directory(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    line = one_line_error(edgec(["export", str(model), "-o", str(out)], tmp_path / "cache"), 2)
    assert str(out) in line


def test_outputs_and_cache_follow_the_umask(tmp_path: Path, model: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out.onnx"
    r = edgec(["export", str(model), "-o", str(out)], cache, umask=0o022)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    for p in cache.rglob("*"):
        if p.parent.name == ".locks":
            continue
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder nobody can read (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="edgec-shared-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _can_drop_privileges() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "true"]).returncode == 0


needs_root = pytest.mark.skipif(not _can_drop_privileges(),
                                reason="read-only cases need root to run edgec as nobody (setpriv)")


@needs_root
def test_read_only_cache_is_exit_3(shared_dir: Path) -> None:
    model = shared_dir / "mlp.onnx"
    onnx.save(small_mlp(dims=(16, 8, 4)), model)
    model.chmod(0o644)
    cache = shared_dir / "cache"  # root's, 0755: nobody cannot write it
    cache.mkdir()
    out = shared_dir / "out"
    out.mkdir()
    out.chmod(0o777)
    r = edgec(["export", str(model), "-o", str(out / "m.onnx")], cache, unprivileged=True)
    line = one_line_error(r, 3)
    assert "cache not writable" in line and str(cache) in line


@needs_root
def test_read_only_output_dir_is_exit_2(shared_dir: Path) -> None:
    model = shared_dir / "mlp.onnx"
    onnx.save(small_mlp(dims=(16, 8, 4)), model)
    model.chmod(0o644)
    cache = shared_dir / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    out = shared_dir / "readonly"  # root's, 0755
    out.mkdir()
    r = edgec(["export", str(model), "-o", str(out / "m.onnx")], cache, unprivileged=True)
    line = one_line_error(r, 2)
    assert str(out) in line


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a full disk needs root to mount a 64 KiB tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_exit_3(tmp_path: Path, tiny_disk: Path) -> None:
    f = tmp_path / "big.onnx"
    onnx.save(small_mlp(dims=(256, 256, 10)), f)  # 260 KB of weights: does not fit in 64 KiB
    r = edgec(["export", str(f), "-o", str(tmp_path / "out.onnx")], tiny_disk / "cache")
    line = one_line_error(r, 3)
    assert "disk full" in line
    assert not [p for p in (tiny_disk / "cache").glob(".tmp-*")], "a partial build was left in the cache"


FACTORY = '''
import torch


class Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return self.fc(x)
        return -self.fc(x)


def make():
    return Branchy()
'''


@pytest.mark.slow  # torch.onnx tries three capture strategies: ~20 s
def test_torch_export_failure_is_one_line(tmp_path: Path) -> None:
    pkg = tmp_path / "branchy_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(FACTORY)
    r = edgec(["export", "branchy_models:make", "--input-shape", "1,8", "-o", str(tmp_path / "m.onnx")],
              tmp_path / "cache", env={"PYTHONPATH": f"{tmp_path}:{REPO}"})
    line = one_line_error(r, 2)
    assert "branchy_models:make" in line


def test_torch_logs_are_silent_without_verbose() -> None:
    """torch resets its loggers when it is imported (after edgec's CLI starts): they must stay quiet."""
    code = ("from toolchain.cli.common import quiet_third_party_logs\n"
            "quiet_third_party_logs()\n"
            "import logging, torch\n"
            "logging.getLogger('torch._subclasses.fake_tensor').error('fake tensor noise')\n"
            "logging.getLogger('torch').warning('torch noise')\n")
    r = subprocess.run([str(Path(sys.executable)), "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 0 and "noise" not in r.stderr, r.stderr


# --- edgec ci: project files and baselines --------------------------------------------------------------------

CI_MODEL = '''
[[model]]
name = "mlp"
source = "mlp.onnx"
target = "ort"
budget_ms = {budget}
{extra}
'''


def _ci_project(tmp_path: Path, project: str = "", model: str | None = None, budget: str = "5.0",
                extra: str = "", gates: str = "") -> Path:
    onnx.save(small_mlp(dims=(16, 8, 4)), tmp_path / "mlp.onnx")
    text = (f'[project]\nname = "p"\nprofile = "x86-avx512"\n{project}\n'
            + (f"[gates]\n{gates}\n" if gates else "")
            + (model if model is not None else CI_MODEL.format(budget=budget, extra=extra)))
    f = tmp_path / "edge.toml"
    f.write_text(text)
    return f


@pytest.mark.parametrize(("case", "kwargs", "needle"), [
    ("project-is-a-number", {"project": ""}, "[project]"),
    ("model-is-a-list-of-numbers", {"model": ""}, "[[model]] #1"),
    ("reports-is-a-file", {"project": 'reports = "mlp.onnx"'}, "reports"),
    ("budget-nan", {"budget": "nan"}, "budget_ms"),
    ("budget-inf", {"budget": "inf"}, "budget_ms"),
    ("min-accuracy-2", {"extra": "min_accuracy = 2.0"}, "min_accuracy"),
    ("alpha-7", {"gates": "alpha = 7"}, "alpha"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_ci_project_values(tmp_path: Path, case: str, kwargs: dict[str, str], needle: str) -> None:
    f = _ci_project(tmp_path, **kwargs)
    if case == "project-is-a-number":
        f.write_text("project = 5\n" + CI_MODEL.format(budget="5.0", extra=""))
    if case == "model-is-a-list-of-numbers":  # top-level keys come before the first table
        f.write_text("model = [1, 2]\n" + f.read_text())
    line = one_line_error(edgec(["ci", str(f)], tmp_path / "cache"), 2)
    assert needle in line and "edge.toml" in line, line


@pytest.mark.parametrize(("case", "content"), [("corrupt", b'{"models": {"mlp": '), ("list", b"[1, 2, 3]"),
                                               ("models-a-list", b'{"models": [1]}'), ("not-utf8", b"\xff\xfe{")])
def test_ci_baseline_damaged(tmp_path: Path, case: str, content: bytes) -> None:
    f = _ci_project(tmp_path)
    (tmp_path / "edge-baseline.json").write_bytes(content)
    line = one_line_error(edgec(["ci", str(f)], tmp_path / "cache"), 2)
    assert "edge-baseline.json" in line and "--update-baseline" in line, line


# --- bench --data with a user's .npz --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ort_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A compiled ort artifact of a 16-8-4 MLP in its own cache: (cache, key)."""
    d = tmp_path_factory.mktemp("ortart")
    f = d / "mlp.onnx"
    onnx.save(small_mlp(dims=(16, 8, 4)), f)
    r = edgec(["compile", str(f), "--profile", "x86-avx512", "--target", "ort", "--json"], d / "cache")
    assert r.returncode == 0, r.stderr
    return d / "cache", json.loads(r.stdout)["artifact"]


@pytest.mark.parametrize(("case", "arrays"), [
    ("empty", {"x": np.zeros((0, 16), np.float32), "y": np.zeros(0, np.int64)}),
    ("wrong-shape", {"x": np.zeros((5, 7), np.float32), "y": np.zeros(5, np.int64)}),
    ("lengths-differ", {"x": np.zeros((5, 16), np.float32), "y": np.zeros(3, np.int64)}),
    ("no-y", {"x": np.zeros((5, 16), np.float32)}),
])
def test_bench_data_npz(tmp_path: Path, ort_artifact: tuple[Path, str], case: str,
                        arrays: dict[str, np.ndarray]) -> None:
    cache, key = ort_artifact
    data = tmp_path / f"{case}.npz"
    np.savez(data, **arrays)
    line = one_line_error(edgec(["bench", key, "--data", str(data), "--duration", "0.05"], cache), 2)
    assert f"{case}.npz" in line or case in line, line


def test_bench_data_not_a_zip(tmp_path: Path, ort_artifact: tuple[Path, str]) -> None:
    cache, key = ort_artifact
    data = tmp_path / "junk.npz"
    data.write_bytes(b"not a zip at all")
    line = one_line_error(edgec(["bench", key, "--data", str(data), "--duration", "0.05"], cache), 2)
    assert "junk.npz" in line


# --- --tracker naming a device's port -------------------------------------------------------------------------

def test_tracker_pointing_at_a_device_port(tmp_path: Path, ort_artifact: tuple[Path, str]) -> None:
    """A real lean device runtime listening on its own port (no tracker): bench --tracker at that port is one line,
    exit 3, saying it is not a tracker."""
    server = DeviceServer("device-token", "solo", None, "127.0.0.1", 0, 1)

    def serve_one() -> None:  # the device's own handshake on the connection edgec makes
        with contextlib.suppress(Exception):
            server._handshake(server.sock.accept()[0])

    threading.Thread(target=serve_one, daemon=True).start()
    try:
        cache, key = ort_artifact
        r = edgec(["bench", key, "--tracker", f"127.0.0.1:{server.port}", "--key", "solo", "--token", "device-token",
                   "--duration", "0.05"], cache, timeout=120)
        line = one_line_error(r, 3)
        assert "tracker" in line and str(server.port) in line, line
    finally:
        server.close()


# --- --json with non-finite numbers ---------------------------------------------------------------------------

def test_json_output_has_no_nan_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    emit({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": {"d": np.float64("nan")}}, True, str)
    out = capsys.readouterr().out

    def refuse(token: str) -> None:
        raise AssertionError(f"invalid JSON token {token}")

    data = json.loads(out, parse_constant=refuse)
    assert data == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": {"d": "nan"}}


# --- the tuning database, torn or corrupt ---------------------------------------------------------------------

def _tiny_database(db_dir: Path) -> None:
    """A real MetaSchedule JSON database with two workloads and a record for each."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(str(db_dir / WORKLOADS), str(db_dir / RECORDS), allow_missing=True)
    target = tvm.target.Target({"kind": "llvm"})
    for n in (16, 32):
        a = te.placeholder((n,), name="A")
        f = te.create_prim_func([a, te.compute((n,), lambda i: a[i] * 2.0, name="B")])
        mod = tvm.IRModule({"main": f})
        wl = db.commit_workload(mod)
        db.commit_tuning_record(ms.database.TuningRecord(Schedule(mod).trace, wl, [0.001], target,
                                                         ms.arg_info.ArgInfo.from_prim_func(f)))


def test_torn_tuning_database_is_repaired_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db_dir = tmp_path / "tuning" / "x86-avx512"
    db_dir.mkdir(parents=True)
    _tiny_database(db_dir)
    workloads = (db_dir / WORKLOADS).read_text().splitlines()
    records = (db_dir / RECORDS).read_text().splitlines()
    assert len(workloads) == 2 and len(records) == 2
    # a torn workload line first (the records' indices shift), a garbage record and a torn last record
    (db_dir / WORKLOADS).write_text("\n".join(['["123", "abc', *workloads]) + "\n")
    shifted = [json.dumps([json.loads(r)[0] + 1, *json.loads(r)[1:]]) for r in records]
    (db_dir / RECORDS).write_text("\n".join([*shifted, "[7, {}]", "not json", shifted[0][:40]]))
    db = open_database(db_dir)
    assert len(db.get_all_tuning_records()) == 2
    assert "skipped 4 torn or corrupt line(s)" in capsys.readouterr().err
    assert (db_dir / WORKLOADS).read_text().splitlines() == workloads
    db = open_database(db_dir)  # repaired: nothing more to skip
    assert len(db.get_all_tuning_records()) == 2 and capsys.readouterr().err == ""
