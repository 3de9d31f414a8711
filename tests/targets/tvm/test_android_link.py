"""Android's dynamic linker can load the phone-arm64 library: linked by clang + lld for the Android triple
without the C library, checked at compile time (no glibc-versioned symbols, no DT_NEEDED beyond
libc/libm/libdl, no text relocations, 16 KB-aligned load segments). A static check: there is no bionic here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from targets.tvm import build
from targets.tvm.elf import ANDROID_ALLOWED_NEEDED, ANDROID_PAGE, EM_AARCH64, android_problems, read_elf
from tests.fixtures.device_models import fit_linear, save
from toolchain import api
from toolchain.core.cache import Cache
from toolchain.core.errors import InfraError
from toolchain.core.profile import load_profile
from toolchain.export import import_onnx_file

pytestmark = pytest.mark.skipif(shutil.which("clang") is None or shutil.which("ld.lld") is None,
                                reason="clang and lld link the Android library: apt-get install clang lld")


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory, fashion: object) -> tuple[Cache, Any]:
    d = tmp_path_factory.mktemp("android")
    cache = Cache(d / "cache")
    src, _ = import_onnx_file(save(fit_linear(fashion, hidden=64), d / "mlp.onnx"), cache)
    return cache, src


def assert_loadable_on_android(path: Path) -> None:
    info = read_elf(path)
    assert info.machine == EM_AARCH64
    assert not [v for _lib, v in info.version_needs if v.startswith("GLIBC")], info.version_needs
    assert set(info.needed) <= ANDROID_ALLOWED_NEEDED, info.needed
    assert not info.textrel
    assert info.loads and all(s.align >= ANDROID_PAGE and (s.offset - s.vaddr) % ANDROID_PAGE == 0
                              for s in info.loads), info.loads
    assert android_problems(path) == []


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_phone_library_passes_the_android_loader_checks(precision: str, linear: tuple[Cache, Any]) -> None:
    cache, src = linear
    if precision == "int8":
        src, _ = api.optimize(src, ["int8"], cache=cache, profile=load_profile("phone-arm64"), data="fashion-mnist")
    art = api.compile(src, profile="phone-arm64", target="tvm", cache=cache)[0]
    assert_loadable_on_android(art.payload)


def test_a_misaligned_android_link_fails_the_compile(linear: tuple[Cache, Any],
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A real clang + lld link with 4 KB pages: the compile refuses it, saying why, and leaves no library."""
    _cache, src = linear
    cache = Cache(tmp_path / "cache")
    src, _ = import_onnx_file(src.payload, cache)
    options = build.android_link_options

    def four_kb(profile: Any) -> list[str]:
        return [o for o in options(profile) if "max-page-size" not in o and "separate-loadable" not in o] + [
            "-Wl,-z,max-page-size=4096"]

    monkeypatch.setattr(build, "android_link_options", four_kb)
    with pytest.raises(InfraError, match="would not load on Android: load segments not 16 KB-aligned"):
        api.compile(src, profile="phone-arm64", target="tvm", cache=cache)


C_SOURCE = "#include <math.h>\n#include <string.h>\nint g;\nint *p(void) { return &g; }\n" \
           "float f(float *x, float *y, int n) { memcpy(y, x, n * 4); return expf(x[0]); }\n"


def test_the_checker_names_glibc_links_and_text_relocations(tmp_path: Path) -> None:
    (tmp_path / "a.c").write_text(C_SOURCE)
    if shutil.which("aarch64-linux-gnu-gcc"):  # what phone-arm64 was linked with before: glibc
        subprocess.run(["aarch64-linux-gnu-gcc", "-shared", "-fPIC", "-o", str(tmp_path / "glibc.so"),
                        str(tmp_path / "a.c"), "-lm"], check=True)
        problems = " ".join(android_problems(tmp_path / "glibc.so"))
        assert "glibc-versioned symbols" in problems and "libc.so.6" in problems
    # Text relocations: non-PIC x86-64 code (large code model: absolute addresses) in a shared library.
    subprocess.run(["gcc", "-c", "-fno-pic", "-mcmodel=large", "-o", str(tmp_path / "a.o"), str(tmp_path / "a.c")],
                   check=True)
    subprocess.run(["gcc", "-shared", "-o", str(tmp_path / "textrel.so"), str(tmp_path / "a.o"), "-lm",
                    "-Wl,-z,notext"], check=True, capture_output=True)
    problems = " ".join(android_problems(tmp_path / "textrel.so"))
    assert "text relocations" in problems and "not aarch64" in problems
