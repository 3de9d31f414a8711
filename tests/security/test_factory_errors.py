"""``edgec export pkg.mod:factory`` runs the user's code: whatever that code does wrong (import, call, return type,
weights, input shape) is the user's input, so exit 2 with one line naming the factory, never exit 4 or a torch
traceback on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.security.edgec_cli import edgec, one_line_error
from toolchain.core.cache import Cache
from toolchain.core.errors import UsageError
from toolchain.export import export_model

FACTORIES = '''
import torch
from torch import nn


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


def raises() -> nn.Module:
    raise RuntimeError("the factory broke\\nsecond line")


def not_a_module():
    return {"weights": 1}


def needs_args(width):
    return nn.Linear(width, 2)
'''

CLI_CASES = {  # spec, extra args, words the one line must hold
    # torch's loggers printed hundreds of lines for these: the user sees one
    "factory-raises": ("userfactories.nets:raises", ["--input-shape", "1,8"], "raised RuntimeError"),
    "wrong-input-shape": ("userfactories.nets:net", ["--input-shape", "1,5"], "check --input-shape"),
    "wrong-weights": ("userfactories.nets:net", ["--input-shape", "1,8", "--weights", "WEIGHTS"], "does not fit"),
    "huge-input-shape": ("userfactories.nets:net", ["--input-shape", f"1,{2**31}"], "elements"),
}
IN_PROCESS_CASES = {
    "not-a-module": ("userfactories.nets:not_a_module", "not a torch.nn.Module"),
    "needs-arguments": ("userfactories.nets:needs_args", "needs argument(s) width"),
    "import-fails": ("userfactories.broken:net", "importing 'userfactories.broken'"),
}


@pytest.fixture(scope="module")
def user_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user")
    pkg = root / "userfactories"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(FACTORIES)
    (pkg / "broken.py").write_text("raise ValueError('module-level failure')\n")
    torch.save({"other.weight": torch.zeros(3, 3)}, root / "wrong.pt")
    return root


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_factory_failure_is_exit_2(tmp_path: Path, user_package: Path, case: str) -> None:
    spec, extra, says = CLI_CASES[case]
    extra = [str(user_package / "wrong.pt") if a == "WEIGHTS" else a for a in extra]
    r = edgec(["export", spec, *extra, "-o", str(tmp_path / "m.onnx")], tmp_path / "cache",
              env={"PYTHONPATH": f"{user_package}:{Path(__file__).resolve().parents[2]}"})
    line = one_line_error(r, 2)
    assert says in line, line
    assert not (tmp_path / "m.onnx").exists()
    assert Cache(tmp_path / "cache").entry_dirs() == [], "a failed export left an entry in the cache"


@pytest.mark.parametrize("case", sorted(IN_PROCESS_CASES))
def test_factory_failure_is_usage_error(tmp_path: Path, user_package: Path, monkeypatch: pytest.MonkeyPatch,
                                        case: str) -> None:
    spec, says = IN_PROCESS_CASES[case]
    monkeypatch.syspath_prepend(str(user_package))
    with pytest.raises(UsageError) as e:
        export_model(spec, Cache(tmp_path / "cache"), "1,8")
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
