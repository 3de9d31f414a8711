"""Apache TVM (Relax, LLVM) target: native x86 builds and aarch64 cross-builds.

The pipeline is an explicit tuple of named steps built from the profile (see ``pipeline``), so a
reader sees top to bottom what happens to the graph. Later steps (hand-written kernel substitution,
MetaSchedule tuning) plug in as further named steps.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from targets import Coverage, SimpleRunner
from toolchain.cache import Artifact, Cache, StepKey
from toolchain.errors import InfraError, SdkMissing, UsageError
from toolchain.onnx_io import fix_batch, input_specs, load_onnx
from toolchain.profile import Profile

Step = tuple[str, Callable[[Any], Any]]

# Tuning for the compiles inside a ``tuning_budget(...)`` block (edgec compile/build --tune-trials, edgec tune):
# the Target contract's compile() has no tuning argument, and api.build compiles several targets in one call.
TUNING: contextvars.ContextVar[Any] = contextvars.ContextVar("edgec_tvm_tuning", default=None)
TUNING_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("edgec_tvm_tuning_progress", default=True)


@contextmanager
def tuning_budget(cfg: Any, progress: bool = True) -> Iterator[None]:
    """Compiles for the TVM target inside this block tune with ``cfg`` (a toolchain.tuning.TuneConfig)."""
    tok, tok2 = TUNING.set(cfg), TUNING_PROGRESS.set(progress)
    try:
        yield
    finally:
        TUNING.reset(tok)
        TUNING_PROGRESS.reset(tok2)

COMPILE_CONFIG_VERSION = 6  # 2: hand-written kernel substitution; 3: dense chains fused; 4: pinned-batch folding;
# 5: fast exp + vector rule for kernels nothing else schedules; 6: auto tuning skips what the rule covers


def _import_tvm():  # -> module
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as e:
        raise SdkMissing(f"TVM is not importable ({e}); pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1") from None
    return tvm


def tvm_target(profile: Profile):  # -> tvm.target.Target
    tvm = _import_tvm()
    return tvm.target.Target(profile.tvm_target())


def import_onnx(model: onnx.ModelProto):  # -> IRModule
    from tvm.relax.frontend.onnx import from_onnx

    pinned = fix_batch(model, 1)
    if pinned != model:
        # A dynamic-batch export computes shapes at run time (Shape -> Gather -> Concat -> Reshape), which
        # TVM's importer turns into PrimValues its Reshape rejects (spiking nets). With the batch pinned,
        # constant folding makes those shapes static, as a static-batch export would have them.
        from toolchain.passes.cleanup import Config as CleanupConfig
        from toolchain.passes.cleanup import run as cleanup

        pinned = cleanup(pinned, CleanupConfig()).model
    model = pinned
    shapes = {s.name: list(s.shape) for s in input_specs(model)}
    dtypes = {s.name: s.dtype for s in input_specs(model)}
    try:
        return from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    except Exception as e:  # noqa: BLE001 -- the frontend raises bare exceptions for unsupported ops
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise UsageError(f"TVM's ONNX importer rejected the model: {first}; try --target ort") from None


def pipeline(profile: Profile, tuning_db: Path | None = None) -> tuple[Step, ...]:
    """The named Relax -> TIR steps for this profile, in order. With ``tuning_db`` (a MetaSchedule
    database directory, see toolchain.tuning) the fused kernels take their tuned schedules."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = tvm_target(profile)

    def seq(passes: list) -> Callable[[Any], Any]:
        import tvm

        def run(mod: Any) -> Any:
            with target:
                return tvm.transform.Sequential(passes)(mod)

        return run

    def substitute(mod: Any) -> Any:
        from kernels.tvm.substitute import KernelConfig, substitute_kernels

        return substitute_kernels(mod, KernelConfig.from_profile(profile))[0]

    def chain(mod: Any) -> Any:
        from kernels.tvm.chain import fuse_gemv_chains

        return fuse_gemv_chains(mod, profile.kernels.gemv_chain_max_kb)[0]

    def apply_db(mod: Any) -> Any:
        from toolchain.tuning import apply_database

        assert tuning_db is not None
        return apply_database(mod, target, tuning_db)

    def fast_exp(mod: Any) -> Any:
        from kernels.tvm.fast_math import rewrite_exp

        return rewrite_exp(mod)[0]

    def vector_rule(mod: Any) -> Any:
        from kernels.tvm.vector_rule import schedule_naive

        return schedule_naive(mod, profile.kernels.vector_lanes)[0]

    k = profile.kernels
    return (
        # Hand-written kernels first, on the Relax graph, while matmul/add/relu are still visible.
        ("substitute-kernels", substitute),
        # Then a tiny MLP's dense layers become one kernel: one VM call instead of four per layer.
        ("fuse-gemv-chains", chain),
        ("decompose", seq([relax.transform.DecomposeOpsForInference()])),
        # exp / sigmoid as vectorizable arithmetic instead of one libm call per element.
        *((("fast-exp", fast_exp),) if k.fast_exp else ()),
        ("library-dispatch", seq(cpu.library_dispatch_passes(target))),
        ("legalize-and-fuse", seq(cpu.legalize_passes(target))),
        *((("apply-tuning-db", apply_db),) if tuning_db is not None else ()),
        # Whatever no hand-written kernel and no tuning record covers: inlined + vectorized by rule.
        *((("vector-rule", vector_rule),) if k.vector_rule else ()),
        ("dataflow-lower", seq(_dataflow_lower(cpu, target))),
        ("finalize", seq(cpu.finalize_passes(target))),
    )


def _dataflow_lower(cpu: Any, target: Any) -> list:
    """The generic dataflow lowering with RewriteDataflowReshape made optional: it asks every
    elementwise kernel whether it is a reshape and fails on block-free hand-written kernels
    (kernels/tvm: lif). Where it fails, reshapes stay copies instead of views: slower, still correct."""
    import tvm

    def guarded(inner: Any) -> Any:
        @tvm.transform.module_pass(opt_level=0, name="RewriteDataflowReshapeGuarded")
        def run(mod: Any, _ctx: Any) -> Any:
            try:
                return inner(mod)
            except tvm.error.InternalError:
                return mod

        return run

    return [guarded(p) if p.info.name == "RewriteDataflowReshape" else p for p in cpu.dataflow_lower_passes(target)]


def kernel_sources_digest() -> str:
    """Hash of the hand-written kernel sources: editing a kernel must not reuse stale libraries."""
    import hashlib

    import kernels.tvm as pkg

    h = hashlib.sha256()
    for p in sorted(Path(pkg.__file__).parent.glob("*.py")):
        if not p.name.startswith("test_"):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def kernel_table(mod: Any) -> list[dict[str, Any]]:
    """Every PrimFunc with its origin: hand-written (edgec.kernel attr), rule (edgec.rule attr: the vector
    rule of kernels/tvm/vector_rule.py), tuned (scheduled otherwise) or generic (naive loops)."""
    import tvm

    rows = []
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        attrs = func.attrs or {}
        if "edgec.kernel" in attrs:
            origin = "hand-written"
        elif "edgec.rule" in attrs:
            origin = "rule"
        elif bool(attrs.get("tirx.is_scheduled", False)):
            origin = "tuned"
        else:
            origin = "generic"
        rows.append({"name": gv.name_hint, "origin": origin, "kernel": str(attrs.get("edgec.kernel", ""))})
    return rows


def build_library(model: onnx.ModelProto, profile: Profile, out: Path,
                  tuning_db: Path | None = None) -> dict[str, Any]:
    """Import, lower and link ``model`` for ``profile`` into the shared library ``out``."""
    from toolchain.tuning import naive_kernels

    tvm = _import_tvm()
    mod = import_onnx(model)
    steps = pipeline(profile, tuning_db)
    naive: list[str] = []
    for name, step in steps:
        mod = step(mod)
        if name == "apply-tuning-db":
            naive = naive_kernels(mod)  # checked right after applying, before the vector rule
    kernels = kernel_table(mod)
    target = tvm_target(profile)
    ex = tvm.compile(mod, target, relax_pipeline=None)
    _export(ex, profile, out)
    return {
        "triple": profile.cpu.mtriple,
        "mcpu": profile.cpu.mcpu,
        "pipeline": [n for n, _ in steps],
        "kernels": kernels,
        "inputs": [s.to_json() for s in input_specs(fix_batch(model, 1))],
        "elf_machine": elf_machine(out),
        # Kernels the tuning database had no record for (the rule may still have scheduled them) ...
        "naive_after_tuning": naive,
        # ... and those that run as naive loops in this library (neither hand-written, tuned nor rule).
        "naive": naive_kernels(mod),
    }


def _export(ex: Any, profile: Profile, out: Path) -> None:
    from tvm.support import cc

    if profile.cpu.cross_cc:
        if not _which(profile.cpu.cross_cc):
            raise SdkMissing(
                f"cross compiler {profile.cpu.cross_cc} not found; apt-get install gcc-aarch64-linux-gnu"
            )
        ex.export_library(str(out), fcompile=cc.cross_compiler(profile.cpu.cross_cc))
    else:
        ex.export_library(str(out))


def _which(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def elf_machine(path: Path) -> str:
    """The ELF e_machine of a shared library: 'x86_64', 'aarch64' or the raw number."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        return "not-elf"
    code = int.from_bytes(head[18:20], "little")
    return {62: "x86_64", 183: "aarch64", 40: "arm"}.get(code, str(code))


class TvmRunner(SimpleRunner):
    def __init__(self, lib_path: Path, input_names: list[str], threads: int) -> None:
        tvm = _import_tvm()
        from tvm import relax

        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        cfg = tvm.get_global_func("runtime.config_threadpool", True)
        if cfg is not None:
            cfg(1, threads)
        self._tvm = tvm
        self.lib = tvm.runtime.load_module(str(lib_path))
        self.vm = relax.VirtualMachine(self.lib, tvm.cpu())
        self.input_names = input_names
        import tvm_ffi

        self._from_dlpack = tvm_ffi.from_dlpack
        # Per input (name, staging array); None until the first call fixes the input shapes.
        self._stage: list[tuple[str, np.ndarray]] | None = None
        self._call: Any = None  # main with the staging tensors bound (VirtualMachine.save_function)
        self._single = True

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # Per-call cost matters as much as the kernels for a ~5 us model, so the hot path is: copy each
        # input into its 64-byte aligned staging array (tvm.runtime.tensor(ndarray) would cost ~10 us),
        # call main with those tensors pre-bound (no argument conversion), read outputs through DLPack.
        # Every call still reads the caller's current input and returns fresh arrays (the .copy(): a
        # graph output may alias a constant or an input, which a later call would overwrite).
        stage = self._stage
        if stage is None:
            return self._bind(feed)
        for name, arr in stage:
            v = feed[name]
            if v.shape != arr.shape or v.dtype != arr.dtype:
                return self._bind(feed)
            np.copyto(arr, v)
        out = self._call()
        if self._single:
            return [np.from_dlpack(out).copy()]
        return [np.from_dlpack(o).copy() for o in out]

    def _bind(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """(Re)create the staging arrays for the shapes in ``feed``, bind them to main, run once."""
        stage, tensors = [], []
        for n in self.input_names:
            v = np.asarray(feed[n])
            arr = _aligned_empty(v.shape, v.dtype)
            stage.append((n, arr))
            tensors.append(self._from_dlpack(arr))
        self.vm.save_function("main", "edgec_bound_main", *tensors)
        self._call = self.vm["edgec_bound_main"]
        self._stage = stage
        for n, arr in stage:
            np.copyto(arr, feed[n])
        out = self._call()
        self._single = hasattr(out, "shape")
        outs = [out] if self._single else list(out)
        return [np.from_dlpack(o).copy() for o in outs]


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary (TVM's buffer alignment)."""
    dt = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape)) * dt.itemsize)
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + nbytes].view(dt).reshape(shape)


class TvmTarget:
    name = "tvm"

    def available(self) -> str | None:
        try:
            _import_tvm()
        except SdkMissing as e:
            return str(e)
        return None

    def supports(self, model: onnx.ModelProto, profile: Profile) -> Coverage:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

        known = set(_get_convert_map())
        sup: dict[str, int] = {}
        unsup: dict[str, str] = {}
        for n in model.graph.node:
            if n.domain not in ("", "ai.onnx"):
                unsup[n.op_type] = f"custom domain {n.domain!r} has no TVM converter"
            elif n.op_type in known:
                sup[n.op_type] = sup.get(n.op_type, 0) + 1
            else:
                unsup[n.op_type] = "TVM's Relax ONNX frontend has no converter for this op"
        notes = () if profile.is_host_native else (f"cross-compiled for {profile.cpu.mtriple}",)
        return Coverage(self.name, sup, unsup, notes)

    def compile(self, art: Artifact, profile: Profile, cache: Cache) -> tuple[Artifact, bool]:
        from toolchain.tuning import TuneConfig, database_digest, database_dir

        model = load_onnx(art.payload, check=False)
        tcfg: TuneConfig | None = TUNING.get()
        tuning = None
        db = None
        tune_summary: dict[str, Any] = {}
        auto: dict[str, Any] | None = None
        if tcfg is not None and tcfg.auto:
            tcfg, auto = self._auto_budget(tcfg, art, profile, cache)
        if tcfg is not None and tcfg.trials > 0:
            if not profile.is_host_native and tcfg.tracker is None:
                raise UsageError(
                    f"tuning for {profile.id} must measure on the device itself; start 'edgec device serve' there "
                    "and pass --tracker HOST:PORT --key KEY (or tune with --tune-trials 0)"
                )
            db = database_dir(cache.root, profile.id)
            tune_summary = self._tune_once(art, profile, tcfg, db, cache)
            # Trials and the database content key the tuned build: a longer tune is a new artifact.
            tuning = {"trials": tcfg.trials, "remote": tcfg.tracker is not None, "db": database_digest(db)}
        cfg = {"target": profile.tvm_target(), "kernels": profile.kernels.__dict__, "tuning": tuning,
               "kernel_sources": kernel_sources_digest()}

        def write(d: Path) -> tuple[str, dict[str, Any]]:
            meta = build_library(model, profile, d / "model.so", tuning_db=db)
            meta["source"] = art.key
            meta["threads"] = profile.bench.threads
            if tuning is not None:
                meta["tuning"] = {**tuning, "measured": tune_summary.get("measured"),
                                  "failed_trials": tune_summary.get("failed"), "database": str(db)}
            if auto is not None:
                meta["auto_tuning"] = auto
            return "model.so", meta

        sk = StepKey("compile:tvm", (art.key,), cfg, COMPILE_CONFIG_VERSION, profile.id)
        return cache.get_or_build(sk, "tvm-lib", write)

    @staticmethod
    def _tune_once(art: Artifact, profile: Profile, tcfg: Any, db: Path, cache: Cache) -> dict[str, Any]:
        """Tune, unless this model already ran this budget to completion against this database. The
        database only grows, so a finished run stays finished; a cached marker records it, with the size of
        the records file then (a deleted or truncated database tunes again). Without the marker every
        compile of a tuned model started the tuning process just to find nothing left to do."""
        import json
        import shutil

        from toolchain.tuning import tune

        records = db / "database_tuning_record.json"
        size = records.stat().st_size if records.is_file() else 0
        run_cfg = {k: v for k, v in tcfg.public().items() if k not in ("builder_timeout_s", "runner_timeout_s")}
        sk = StepKey("tvm-tuning-run", (art.key,), run_cfg, 1, profile.id)
        done = cache.get(sk.digest())
        if done is not None and size >= int(done.meta["records_bytes"]):
            return {**done.meta["summary"], "measured": 0, "skipped": "this budget already ran for this model"}
        if done is not None:
            shutil.rmtree(done.dir, ignore_errors=True)  # stale: the database lost records since
        summary = tune(art.payload, profile.id, tcfg, db, progress=TUNING_PROGRESS.get())

        def write(d: Path) -> tuple[str, dict[str, Any]]:
            (d / "summary.json").write_text(json.dumps(summary, default=str))
            return "summary.json", {"summary": summary,
                                    "records_bytes": records.stat().st_size if records.is_file() else 0}

        cache.get_or_build(sk, "tvm-tuning-run", write)
        return summary

    @staticmethod
    def _auto_budget(tcfg: Any, art: Artifact, profile: Profile, cache: Cache) -> tuple[Any, dict[str, Any]]:
        """Resolve "auto" tuning: the profile's trials where heavy layers run naive, else none. A cross
        profile without a device to measure on is not tuned (its heavy layers are reported instead).
        The decision needs the model imported and lowered to fused kernels (seconds), and the compile's
        cache key depends on it, so it is a cached step of its own: a repeated build stays all cache hits."""
        import json

        from toolchain.tuning import auto_trials

        def write(d: Path) -> tuple[str, dict[str, Any]]:
            trials, heavy = auto_trials(art.payload, profile)
            plan = {"trials": trials, "heavy_naive": [[n, round(m, 2)] for n, m in heavy]}
            (d / "plan.json").write_text(json.dumps(plan))
            return "plan.json", plan

        sk = StepKey("tvm-auto-tuning-plan", (art.key,), {"tuning": profile.tuning.__dict__,
                     "kernels": profile.kernels.__dict__, "kernel_sources": kernel_sources_digest()},
                     COMPILE_CONFIG_VERSION, profile.id)
        plan_art, _ = cache.get_or_build(sk, "json", write)
        info: dict[str, Any] = json.loads(plan_art.payload.read_text())
        trials = int(info["trials"])
        if trials and not profile.is_host_native and tcfg.tracker is None:
            info.update(trials=0, skipped="no device to measure on: pass --tracker HOST:PORT --key KEY")
            return None, info
        if not trials:
            return None, info
        return dataclasses.replace(tcfg, trials=trials, auto=False, min_mflops=profile.tuning.auto_min_mflops), info

    def load(self, art: Artifact) -> TvmRunner:
        machine = art.meta.get("elf_machine")
        if machine != platform.machine():
            raise UsageError(
                f"artifact {art.key[:12]} is a {machine} library for {art.meta.get('triple')}; "
                "run it on that device (edgec bench --tracker HOST:PORT --key KEY)"
            )
        names = [i["name"] for i in art.meta.get("inputs", [])]
        return TvmRunner(art.payload, names, int(art.meta.get("threads", 1)))

    def kernels(self, art: Artifact) -> list[dict[str, Any]]:
        """Kernels per layer from the build meta; on a machine that can run the library, each with its
        measured time per inference and share of the kernel time."""
        rows = [dict(r) for r in art.meta.get("kernels", [])]
        if art.meta.get("elf_machine") != platform.machine() or not rows:
            return rows
        try:
            times = kernel_times(art.payload, art.meta.get("inputs", []))
        except Exception:  # noqa: BLE001 -- timing is a bonus: a library that cannot run here still lists its kernels
            return rows
        total = sum(times.get(r["name"], 0.0) for r in rows) or 1.0
        for r in rows:
            t = times.get(r["name"])
            if t is not None:
                r["us_per_run"] = round(t * 1e6, 2)
                r["time_share"] = round(t / total, 4)
        return rows


def kernel_times(lib_path: Path, inputs: list[dict[str, Any]], runs: int = 200) -> dict[str, float]:
    """Seconds per inference spent in each PrimFunc, from the Relax VM's call instrument (wall time
    between the VM's before/after hooks, averaged over ``runs`` after a warmup)."""
    import time

    tvm = _import_tvm()
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(i["shape"]).astype(i["dtype"])) for i in inputs]
    main = vm["main"]
    for _ in range(20):
        main(*args)
    acc: dict[str, float] = {}
    start = [0.0]

    def instrument(_func: Any, name: str, before: bool, _ret: Any, *_a: Any) -> Any:
        if before:
            start[0] = time.perf_counter()
        else:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - start[0]
        return relax.VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    for _ in range(runs):
        main(*args)
    return {k: v / runs for k, v in acc.items()}


def qemu_available() -> bool:
    try:
        subprocess.run(["qemu-aarch64", "--version"], capture_output=True, check=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


__all__ = ["InfraError", "TvmRunner", "TvmTarget", "build_library", "elf_machine", "pipeline"]
