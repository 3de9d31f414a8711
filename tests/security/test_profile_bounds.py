"""Profile values a careless or hostile user writes: each is refused at load with exit 2 and one line naming the
file and the key, instead of a SIGSEGV in LLVM, a run that never ends, or gigabytes of threads. The LLVM checks
(triple architecture, mcpu) run before codegen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest

from tests.fixtures.models import small_mlp
from tests.security.edgec_cli import REPO, edgec, one_line_error
from toolchain.core.errors import UsageError
from toolchain.core.profile import check_llvm_target, load_profile

BASE = (REPO / "profiles" / "x86-avx512.toml").read_text()


def _profile(tmp_path: Path, old: str, new: str, name: str = "bad") -> Path:
    assert old in BASE, old
    text = BASE.replace(old, new).replace('id = "x86-avx512"', f'id = "{name}"')
    f = tmp_path / f"{name}.toml"
    f.write_text(text)
    return f


CASES = {  # (text in the base profile, replacement, words the error must hold)
    "threads-huge": ("threads = 1", "threads = 100000", "bench.threads"),
    "threads-over-cores": ("threads = 1", "threads = 9", "4 x cpu.num_cores"),
    "warmup-inf": ("[bench]\n", "[bench]\nwarmup_s = inf\n", "bench.warmup_s"),
    "duration-nan": ("[bench]\n", "[bench]\nduration_s = nan\n", "bench.duration_s"),
    "duration-zero": ("[bench]\n", "[bench]\nduration_s = 0.0\n", "bench.duration_s"),
    "min-runs-huge": ("[bench]\n", "[bench]\nmin_runs = 10000000000\n", "bench.min_runs"),
    "targets-empty": ('targets = ["tvm", "ort"]', "targets = []", "targets"),
    "cores-huge": ("num_cores = 2", "num_cores = 1000000", "cpu.num_cores"),
    "vector-bits-huge": ("vector_bits = 512", "vector_bits = 131072", "cpu.vector_bits"),
    "mtriple-garbage": ('mtriple = "x86_64-linux-gnu"', 'mtriple = "garbage"', "cpu.mtriple"),
    "trials-huge": ("[bench]\n", "[tuning]\nauto_trials = 100000000\n\n[bench]\n", "tuning.auto_trials"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_profile_value_is_refused(tmp_path: Path, case: str) -> None:
    old, new, says = CASES[case]
    f = _profile(tmp_path, old, new)
    with pytest.raises(UsageError) as e:
        load_profile(str(f))
    assert says in str(e.value) and "bad.toml" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["mtriple-garbage", "duration-nan"])
def test_bad_profile_is_exit_2_on_the_cli(tmp_path: Path, case: str) -> None:
    """The cases that crashed (SIGSEGV), ate memory or never finished, as the user meets them."""
    old, new, says = CASES[case]
    f = _profile(tmp_path, old, new)
    line = one_line_error(edgec(["profiles", "show", str(f)], tmp_path / "cache", timeout=60), 2)
    assert says in line and "bad.toml" in line, line


def test_non_utf8_profile_is_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "latin.toml"
    f.write_bytes(BASE.replace('id = "x86-avx512"', 'id = "latin"').replace("x86-64", "x86\xe9").encode("latin-1"))
    line = one_line_error(edgec(["profiles", "show", str(f)], tmp_path / "cache", timeout=60), 2)
    assert "UTF-8" in line and "latin.toml" in line


@pytest.mark.parametrize("field, value, says", [("mcpu", "znver99", "cpu.mcpu"),
                                                ("mtriple", "sparc64-linux-gnu", "'sparc64' backend")])
def test_llvm_check_names_the_key(field: str, value: str, says: str) -> None:
    prof = load_profile("x86-avx512")
    bad = dataclasses.replace(prof, cpu=dataclasses.replace(prof.cpu, **{field: value}))
    with pytest.raises(UsageError, match=says):
        check_llvm_target(bad)
    check_llvm_target(prof)


@pytest.mark.slow
def test_unknown_mcpu_refused_before_codegen(tmp_path: Path) -> None:
    """A valid triple with a CPU LLVM does not know: refused when TVM is about to compile, with the key named."""
    model = tmp_path / "mlp.onnx"
    onnx.save(small_mlp(dims=(8, 4)), model)
    f = _profile(tmp_path, 'mcpu = "znver4"', 'mcpu = "znver99"')
    cache = tmp_path / "cache"
    r = edgec(["compile", str(model), "--profile", str(f), "--target", "tvm"], cache, timeout=300)
    line = one_line_error(r, 2)
    assert "cpu.mcpu" in line and "znver99" in line, line
    assert not list(cache.glob(".tmp-*")), "a build directory was left behind"


def test_huge_input_dimension_refused_before_allocation(tmp_path: Path) -> None:
    """An ONNX input of 2**31 features: build must refuse before allocating 64 evaluation samples of it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2**31])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2**31])])
    model = tmp_path / "wide.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    r = edgec(["build", str(model), "--profile", "x86-avx512", "--target", "ort"], tmp_path / "cache", timeout=300)
    line = one_line_error(r, 2)
    assert "elements" in line, line
