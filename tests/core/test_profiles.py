from __future__ import annotations

from pathlib import Path

import pytest

from toolchain.core.errors import UsageError
from toolchain.core.profile import PROFILE_DIR, all_profiles, load_profile, profile_ids

REQUIRED = {"x86-avx512", "x86-avx2", "phone-arm64", "rpi5", "jetson-orin-nano", "jetson-agx-orin"}


def test_required_profiles_exist_and_validate() -> None:
    assert REQUIRED <= set(profile_ids())
    for p in all_profiles():
        assert p.targets, p.id
        assert p.cpu.mtriple.startswith(p.cpu.arch), p.id
        if "tensorrt" in p.targets:
            assert p.gpu is not None and p.gpu.sm >= 50
        if p.cpu.arch == "aarch64":
            assert p.cpu.cross_cc, "aarch64 profiles need a cross linker on x86 hosts"


def test_profile_is_frozen() -> None:
    p = load_profile("x86-avx512")
    with pytest.raises(AttributeError):
        p.id = "other"  # type: ignore[misc]
    assert p.tvm_target()["mcpu"] == "znver4"


def _write(tmp_path: Path, text: str, name: str = "x86-avx512") -> Path:
    f = tmp_path / f"{name}.toml"
    f.write_text(text)
    return f


def _base() -> str:
    return (PROFILE_DIR / "x86-avx512.toml").read_text()


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    f = _write(tmp_path, _base().replace("vector_bits = 512", "vector_bits = 512\nvektor = 3"))
    with pytest.raises(UsageError, match=r"x86-avx512\.toml.*cpu\.vektor"):
        load_profile(str(f))


def test_unknown_top_level_key(tmp_path: Path) -> None:
    f = _write(tmp_path, "colour = 'red'\n" + _base())
    with pytest.raises(UsageError, match="unknown key 'colour'"):
        load_profile(str(f))


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ('arch = "x86_64"', 'arch = "sparc"', "cpu.arch"),
        ("num_cores = 2", 'num_cores = "two"', "cpu.num_cores"),
        ("threads = 1", "threads = -1", "bench.threads"),
        ('targets = ["tvm", "ort"]', 'targets = ["tvm", "cuda"]', "unknown target 'cuda'"),
        ('int8_dot = "vnni"', "int8_dot = 1", "cpu.int8_dot"),
    ],
)
def test_bad_values_are_errors(tmp_path: Path, old: str, new: str, match: str) -> None:
    f = _write(tmp_path, _base().replace(old, new))
    with pytest.raises(UsageError, match=match):
        load_profile(str(f))


def test_id_must_match_file_name(tmp_path: Path) -> None:
    f = _write(tmp_path, _base(), name="other")
    with pytest.raises(UsageError, match="must match the file name"):
        load_profile(str(f))


def test_bad_toml_syntax(tmp_path: Path) -> None:
    f = _write(tmp_path, "id = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_profile(str(f))


def test_unknown_profile_lists_choices() -> None:
    with pytest.raises(UsageError, match="x86-avx512"):
        load_profile("pdp-11")
