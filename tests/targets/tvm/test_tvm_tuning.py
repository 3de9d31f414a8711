"""Tuning plumbing: database applied, naive kernels reported, remote profiles refuse local measuring,
and (slow) a real MetaSchedule run that schedules every kernel and resumes from its database."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.core.errors import UsageError
from toolchain.core.profile import load_profile


def _layernorm_model(tmp_path: Path) -> Path:
    """One LayerNorm + Sigmoid: kernels no hand-written kernel covers (they stay generic untuned)."""
    n = 64
    return _save(tmp_path / "ln.onnx",
                 [helper.make_node("LayerNormalization", ["x", "s", "b"], ["l"], axis=-1),
                  helper.make_node("Sigmoid", ["l"], ["y"])],
                 [1, n], [1, n], {"s": np.ones(n, np.float32), "b": np.zeros(n, np.float32)})


def _save(path: Path, nodes: list, x_shape: list[int], y_shape: list[int], inits: dict[str, np.ndarray]) -> Path:
    g = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def test_empty_database_leaves_kernels_naive_and_says_so(tmp_path: Path) -> None:
    from targets.tvm.database import apply_database, naive_kernels
    from targets.tvm.frontend import tvm_target
    from targets.tvm.tuning import tunable_module

    prof = load_profile("x86-avx512")
    mod = tunable_module(_layernorm_model(tmp_path), prof)
    applied = apply_database(mod, tvm_target(prof), tmp_path / "db")
    assert naive_kernels(applied)  # nothing tuned: reported, not silently accepted


def test_build_library_records_naive_after_tuning(tmp_path: Path) -> None:
    from targets.tvm.build import build_library

    meta = build_library(onnx.load(str(_layernorm_model(tmp_path))), load_profile("x86-avx512"),
                         tmp_path / "m.so", tuning_db=tmp_path / "db")
    assert "apply-tuning-db" in meta["pipeline"]
    assert meta["naive_after_tuning"]  # no tuning record: reported ...
    assert meta["naive"] == [] and {k["origin"] for k in meta["kernels"]} == {"rule"}  # ... and the rule took them


def test_remote_profile_refuses_to_tune_on_the_host(tmp_path: Path, cache: object) -> None:
    from targets.base import CompileOptions, TuneOptions
    from targets.tvm import TvmTarget
    from toolchain.export import import_onnx_file

    art, _ = import_onnx_file(_layernorm_model(tmp_path), cache)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="on the device"):
        TvmTarget().compile(art, load_profile("rpi5"), cache,  # type: ignore[arg-type]
                            CompileOptions(tune=TuneOptions(trials=8, progress=False)))


def test_tune_config_validation() -> None:
    from targets.tvm.tuning import TuneConfig

    with pytest.raises(UsageError):
        TuneConfig(trials=-1)
    with pytest.raises(UsageError, match="--key"):
        TuneConfig(trials=4, tracker="127.0.0.1:9190")


@pytest.mark.slow
def test_tuning_schedules_every_kernel_and_resumes(tmp_path: Path) -> None:
    from targets.tvm.tuning import TuneConfig, tune

    model = _layernorm_model(tmp_path)
    db = tmp_path / "db"
    cfg = TuneConfig(trials=8, trials_per_batch=4)
    first = tune(model, "x86-avx512", cfg, db, progress=False)
    assert first["measured"] > 0
    assert first["naive"] == [], f"kernels left naive after tuning: {first['naive']}"
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert records and all(json.loads(r) for r in records)
    again = tune(model, "x86-avx512", cfg, db, progress=False)  # budget already met: resumes, measures nothing
    assert again["resumed_trials"] >= 1
    assert again["measured"] <= first["measured"]


def _conv_model(tmp_path: Path) -> Path:
    """Conv(1->8) + grouped Conv(8->16, 2 groups) on 28x28: the first takes the direct conv kernel, no
    hand-written kernel covers the grouped one (~0.8 MFLOP)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((16, 4, 3, 3)) * 0.1).astype(np.float32)
    return _save(tmp_path / "convs.onnx",
                 [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c1"], ["r1"]),
                  helper.make_node("Conv", ["r1", "w2"], ["y"], kernel_shape=[3, 3], group=2)],
                 [1, 1, 28, 28], [1, 16, 26, 26], {"w1": w1, "w2": w2})


def test_auto_budget_tunes_only_where_heavy_layers_run_naive(tmp_path: Path) -> None:
    from kernels.tvm.testing import with_kernels
    from targets.tvm.tuning import auto_trials
    from tests.fixtures.models import small_mlp

    prof = load_profile("x86-avx512")
    trials, heavy = auto_trials(_conv_model(tmp_path), prof)
    assert trials == prof.tuning.auto_trials > 0
    assert heavy and all(m >= prof.tuning.auto_min_mflops for _, m in heavy)
    assert any("conv" in name for name, _ in heavy)
    mlp = tmp_path / "mlp.onnx"
    onnx.save(small_mlp(), mlp)
    assert auto_trials(mlp, prof) == (0, [])  # hand-written GEMV covers every layer: 0 minutes of tuning
    assert auto_trials(_layernorm_model(tmp_path), prof) == (0, [])  # naive, but too little work to be worth it
    # Heavy but elementwise (an RBF-like expansion of a large tensor): the vector rule is all it needs ...
    n = 1 << 17
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Neg", ["sq"], ["n"]),
             helper.make_node("Exp", ["n"], ["e"]), helper.make_node("Mul", ["e", "x"], ["y"])]
    wide = _save(tmp_path / "wide.onnx", nodes, [1, n], [1, n], {})
    assert auto_trials(wide, prof) == (0, [])
    # ... while without the rule it runs naive and is worth tuning.
    trials, heavy = auto_trials(wide, with_kernels(prof, vector_rule=False))
    assert trials > 0 and heavy


def test_auto_budget_is_recorded_and_skips_cross_profiles_without_a_device(tmp_path: Path, cache: object) -> None:
    from targets.tvm import TvmTarget
    from tests.fixtures.models import small_mlp
    from toolchain.export import import_onnx_file

    mlp = tmp_path / "mlp.onnx"
    onnx.save(small_mlp(), mlp)
    art, _ = import_onnx_file(mlp, cache)  # type: ignore[arg-type]
    out, _ = TvmTarget().compile(art, load_profile("x86-avx512"), cache)  # type: ignore[arg-type]
    assert out.meta["auto_tuning"] == {"trials": 0, "heavy_naive": []} and "tuning" not in out.meta
    # the auto decision (the default options) is cached too: a repeat is one cache hit
    again, hit = TvmTarget().compile(art, load_profile("x86-avx512"), cache)  # type: ignore[arg-type]
    assert hit and again.key == out.key
    conv, _ = import_onnx_file(_conv_model(tmp_path), cache)  # type: ignore[arg-type]
    # rpi5 needs the device to measure: reported, not tuned here
    out, _ = TvmTarget().compile(conv, load_profile("rpi5"), cache)  # type: ignore[arg-type]
    assert out.meta["auto_tuning"]["trials"] == 0 and "--tracker" in out.meta["auto_tuning"]["skipped"]
    assert out.meta["auto_tuning"]["heavy_naive"]


@pytest.mark.slow
def test_cli_default_auto_tunes_a_conv_model_until_no_kernel_is_naive(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    r = subprocess.run([str(bin_dir / "edgec"), "compile", str(_conv_model(tmp_path)), "--profile", "x86-avx512",
                        "--target", "tvm", "--json"], capture_output=True, text=True, timeout=1800, check=False,
                       env={**os.environ, "EDGEC_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads(r.stdout)["meta"]
    assert meta["auto_tuning"]["trials"] == load_profile("x86-avx512").tuning.auto_trials
    assert meta["tuning"]["trials"] == meta["auto_tuning"]["trials"]
    heavy = {name for name, _ in meta["auto_tuning"]["heavy_naive"]}
    assert heavy and not heavy & set(meta["naive_after_tuning"])  # the whole budget went to the heavy layers
    assert meta["naive"] == []  # whatever tuning did not cover (light kernels) took the vector rule
    assert {k["origin"] for k in meta["kernels"]} <= {"tuned", "rule", "hand-written"}
    # A finished budget is not run again: the marker makes the next compile skip the tuning process ...
    from targets.tvm.database import database_dir
    from targets.tvm.tuning import TuneConfig, tune_once
    from toolchain.core.cache import Cache
    from toolchain.export import import_onnx_file

    cache = Cache(tmp_path / "cache")
    art, hit = import_onnx_file(_conv_model(tmp_path), cache)
    assert hit
    prof = load_profile("x86-avx512")
    cfg = TuneConfig(trials=meta["tuning"]["trials"], min_mflops=prof.tuning.auto_min_mflops)
    db = database_dir(cache.root, prof.id)
    assert "skipped" in tune_once(art, prof, cfg, db, cache)
    # ... unless the database lost records since: then it tunes again (resuming from what is left).
    records = db / "database_tuning_record.json"
    records.write_text(records.read_text().splitlines()[0] + "\n")
    again = tune_once(art, prof, cfg, db, cache)
    assert "skipped" not in again and again["measured"] > 0


def test_phone_candidates_are_linked_like_the_phone_library(tmp_path: Path) -> None:
    """phone-arm64's tuning candidates go through the final build's link (clang + lld for the Android triple, no C
    library, 16 KB pages), not the Linux cross compiler: each passes the Android loader checks the build runs."""
    import shutil

    import tvm
    from tvm import te

    from targets.tvm.build import library_linker
    from targets.tvm.elf import ANDROID_PAGE, android_problems, read_elf
    from targets.tvm.frontend import tvm_target
    from targets.tvm.tuning import candidate_exporter

    if shutil.which("clang") is None or shutil.which("ld.lld") is None:
        pytest.skip("clang and lld link the Android library: apt-get install clang lld")
    prof = load_profile("phone-arm64")
    compiler, options = library_linker(prof)
    assert compiler == "clang" and any("android" in o for o in options)
    a = te.placeholder((64,), name="a")
    add = te.create_prim_func([a, te.compute((64,), lambda i: a[i] + 1.0, name="b")])
    lib = tvm.compile(tvm.IRModule({"main": add}), tvm_target(prof))
    path = Path(candidate_exporter(compiler, options)(lib))
    assert path.name.startswith("edgec-ms-") and path.suffix == ".so"
    assert android_problems(path) == [] and read_elf(path).loads[0].align == ANDROID_PAGE
    if shutil.which(prof.cpu.cross_cc or ""):  # the GNU cross link it replaced: its own page size (64 KB)
        old = Path(candidate_exporter(prof.cpu.cross_cc)(lib))
        assert read_elf(old).loads[0].align != ANDROID_PAGE


def _resblock_model(tmp_path: Path) -> Path:
    """A ResNet-style block with a downsample: conv 3x3/2 + relu, conv 3x3, 1x1/2 downsample conv, the two summed,
    relu. The Add is absorbed by one of the two convs it sums (two layer shapes share it)."""
    rng = np.random.default_rng(2)

    def w(oc: int, ic: int, k: int) -> np.ndarray:
        return (rng.standard_normal((oc, ic, k, k)) / np.sqrt(ic * k * k)).astype(np.float32)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wd", "bd"], ["cd"], kernel_shape=[1, 1], strides=[2, 2]),
             helper.make_node("Add", ["c2", "cd"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    inits = {"w1": w(32, 16, 3), "b1": np.zeros(32, np.float32), "w2": w(32, 32, 3),
             "b2": np.full(32, 0.1, np.float32), "wd": w(32, 16, 1), "bd": np.zeros(32, np.float32)}
    return _save(tmp_path / "resblock.onnx", nodes, [1, 16, 24, 24], [1, 32, 12, 12], inits)


def _commit_plain_record(layer: object, prof: object, db_dir: Path) -> None:
    """A tuning record for the layer's generic conv: its loop nest unchanged (a valid schedule MetaSchedule would
    measure like any other), so the database covers the layer without running a search."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from targets.tvm.conv_choice import conv_tasks
    from targets.tvm.database import open_database
    from targets.tvm.frontend import tvm_target

    (task,) = conv_tasks(layer, prof)  # type: ignore[arg-type]
    mod = task.dispatched[0]
    db = open_database(db_dir)
    sch = tvm.s_tir.Schedule(mod)
    sch.get_loops(sch.get_child_blocks(sch.get_sblock("root"))[-1])  # a trace of one step (an empty one is skipped)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(mod), [tvm.tirx.FloatImm("float64", 1e-5)], tvm_target(prof),  # type: ignore[arg-type]
        ms.arg_info.ArgInfo.from_prim_func(mod["main"])))


def test_conv_layers_are_sliced_as_the_build_matches_them(tmp_path: Path) -> None:
    from kernels.tvm import KernelConfig
    from kernels.tvm.passes import SubstituteConv
    from targets.tvm.conv_choice import conv_layers
    from targets.tvm.frontend import import_onnx

    model = onnx.load(str(_resblock_model(tmp_path)))
    prof = load_profile("x86-avx512")
    layers = conv_layers(model, prof)
    whole = SubstituteConv.create(KernelConfig.from_profile(prof))
    whole(import_onnx(model))
    assert sorted(c.key for c in layers) == sorted(r["layer"] for r in whole.report)  # all 3, as the build has them
    assert sum("+residual" in c.key for c in layers) == 1  # the Add went to one conv, not both
    assert [c.mflops for c in layers] == sorted((c.mflops for c in layers), reverse=True)
    assert [c.key for c in conv_layers(model, prof, min_mflops=1.0)] == [c.key for c in layers if c.mflops >= 1.0]


@pytest.mark.slow  # three builds and two comparisons: ~30 s on the shared machine
def test_build_keeps_the_tuned_conv_only_where_chosen_and_recorded(tmp_path: Path) -> None:
    """The database's kernel choice decides per layer: a layer chosen "tuned" with a record leaves the direct kernel
    for its tuned schedule (the kernels list says which); chosen without a record, the build falls back to the
    hand-written kernel instead of running naive loops; a comparison needs a record to pick anything but "hand"."""
    import onnxruntime as ort

    from targets.tvm.build import build_library
    from targets.tvm.conv_choice import compare, conv_layers
    from targets.tvm.database import database_digest, record_kernel_choices, tuned_conv_layers
    from toolchain.device.runners import TvmLibRunner

    path = _resblock_model(tmp_path)
    model = onnx.load(str(path))
    prof = load_profile("x86-avx512")
    layer = conv_layers(model, prof)[0]
    x = np.random.default_rng(0).standard_normal((1, 16, 24, 24)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    def build(db: Path) -> dict:
        meta = build_library(model, prof, tmp_path / "m.so", tuning_db=db)
        out = TvmLibRunner(tmp_path / "m.so", ["x"], 1).infer({"x": x})[0]
        assert np.abs(np.asarray(out) - ref).max() <= 1e-4 * np.abs(ref).max()
        assert meta["naive"] == []
        return meta

    empty = tmp_path / "empty"
    assert compare(layer, prof, empty)["origin"] == "hand"  # nothing tuned: nothing to compare
    record_kernel_choices(empty, {layer.key: {"origin": "tuned"}})  # chosen, but the database has no record
    assert tuned_conv_layers(empty) == {layer.key}
    meta = build(empty)
    assert meta["conv_tuned"] == {} and [k.get("choice") for k in meta["kernels"]].count("hand") == 3

    db = tmp_path / "db"
    _commit_plain_record(layer, prof, db)
    before = database_digest(db)
    rec = compare(layer, prof, db)
    assert rec["hand_us"] > 0 and rec["tuned_us"] > 0
    assert rec["origin"] == ("tuned" if rec["tuned_us"] < rec["hand_us"] else "hand")
    record_kernel_choices(db, {layer.key: {**rec, "origin": "tuned"}})  # as if it had measured faster
    assert database_digest(db) != before  # a new choice is a new tuned build
    meta = build(db)
    assert list(meta["conv_tuned"]) == [layer.key]
    choices = [(k["origin"], k["choice"]) for k in meta["kernels"] if "choice" in k]
    assert sorted(choices) == [("hand-written", "hand"), ("hand-written", "hand"), ("tuned", "tuned")]
