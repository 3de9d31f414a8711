"""User and environment errors end as exit 2 (the input is wrong) or 3 (the environment is), with one line that
names the file and the fix: never exit 4 "internal error", never a torch log on stderr. Read-only cases run as
nobody (root ignores permissions); the full disk is a small tmpfs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from tests.models import small_mlp
from tests.security.edgec_cli import REPO, edgec, one_line_error


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
