"""Cross-compilation for ARM profiles: an aarch64 shared library that records its triple."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from kernels.tvm.testing import dense_onnx
from toolchain.core.profile import load_profile

needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                                 reason="aarch64-linux-gnu-gcc missing: apt-get install gcc-aarch64-linux-gnu")


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    dims = [784, 64, 64, 10]  # mlp-small-like, smaller so the cross build stays fast
    ws = [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32) for a, b in itertools.pairwise(dims)]
    return dense_onnx(ws, [np.zeros(b, np.float32) for b in dims[1:]], gemm=True)


@needs_cross
@pytest.mark.parametrize("profile_id", ["phone-arm64", "rpi5"])
def test_arm_profile_builds_aarch64_library(profile_id: str, tmp_path: Path) -> None:
    from targets.tvm.build import build_library, elf_machine

    prof = load_profile(profile_id)
    out = tmp_path / "model.so"
    meta = build_library(_mlp(), prof, out)
    assert elf_machine(out) == "aarch64"
    assert meta["elf_machine"] == "aarch64"
    assert meta["triple"] == prof.cpu.mtriple
    # NEON-width hand-written kernels, chosen by the profile: the three small layers as one chain kernel
    assert [k["kernel"] for k in meta["kernels"]] == ["gemv-chain-f32"]


@needs_cross
def test_aarch64_artifact_refuses_to_load_here(tmp_path: Path, cache: object) -> None:
    import platform

    from targets.tvm import TvmTarget
    from toolchain.core.errors import UsageError
    from toolchain.export import import_onnx_file

    if platform.machine() == "aarch64":
        pytest.skip("host is aarch64")
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), path)
    art, _ = import_onnx_file(path, cache)  # type: ignore[arg-type]
    lib, _ = TvmTarget().compile(art, load_profile("rpi5"), cache)  # type: ignore[arg-type]
    assert lib.meta["elf_machine"] == "aarch64"
    with pytest.raises(UsageError, match="run it on that device"):
        TvmTarget().load(lib)
