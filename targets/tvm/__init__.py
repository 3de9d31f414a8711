"""Apache TVM (Relax, LLVM) target: native x86 builds and aarch64 cross-builds.

The package, in data-flow order: ``frontend`` (SDK, LLVM target, ONNX import) -> ``pipeline`` (named
lowering steps) -> ``database`` / ``tuning`` (MetaSchedule) -> ``build`` (link the library) and ``inspect`` (what
runs where). Libraries run on the Relax VM through ``toolchain.device.runners.TvmLibRunner``, the same runner a
device uses. This module is the ``targets.base.Target`` over them.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import onnx

from targets.base import CompileOptions, Coverage
from targets.tvm.build import build_library, kernel_sources_digest
from targets.tvm.database import database_digest, database_dir
from targets.tvm.frontend import import_tvm, onnx_converters
from targets.tvm.inspect import kernel_times
from targets.tvm.tuning import TuneConfig, plan_auto_tuning, tune_once
from toolchain.core.cache import Artifact, Cache, StepKey
from toolchain.core.errors import SdkMissing, UsageError
from toolchain.core.onnx_io import load_onnx
from toolchain.core.profile import Profile
from toolchain.device.runners import TvmLibRunner

COMPILE_CONFIG_VERSION = 7  # 2: hand-written kernel substitution; 3: dense chains fused; 4: pinned-batch folding;
# 5: fast exp + vector rule for kernels nothing else schedules; 6: auto tuning skips what the rule covers;
# 7: auto tuning skips pooling the rule schedules and runs under a time budget


class TvmTarget:
    name = "tvm"

    def available(self) -> str | None:
        try:
            import_tvm()
        except SdkMissing as e:
            return str(e)
        return None

    def supports(self, model: onnx.ModelProto, profile: Profile) -> Coverage:
        known = set(onnx_converters())  # TVM's frontend and edgec's converters (ConvInteger)
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

    def compile(self, art: Artifact, profile: Profile, cache: Cache,
                options: CompileOptions = CompileOptions()) -> tuple[Artifact, bool]:
        model = load_onnx(art.payload, check=False)
        if options.batch < 1:
            raise UsageError(f"--batch must be at least 1, got {options.batch}")
        tcfg: TuneConfig | None = TuneConfig.from_options(options.tune)
        if options.batch != 1 and options.tune.trials is None:
            tcfg = None  # "auto" tunes batch-1 deployments; a throughput build tunes only when asked
        tuning = None
        db = None
        tune_summary: dict[str, Any] = {}
        auto: dict[str, Any] | None = None
        if tcfg is not None and tcfg.auto:
            tcfg, auto = plan_auto_tuning(tcfg, art, profile, cache, {"kernel_sources": kernel_sources_digest(),
                                                                       "version": COMPILE_CONFIG_VERSION})
        if tcfg is not None and tcfg.trials > 0:
            if not profile.is_host_native and tcfg.tracker is None:
                raise UsageError(
                    f"tuning for {profile.id} must measure on the device itself; start 'edgec device serve' there "
                    "and pass --tracker HOST:PORT --key KEY (or tune with --tune-trials 0)"
                )
            # Records timed on an emulated device (key <profile>-emulated) go to their own database, never the device's.
            emulated = (tcfg.device_key or "").endswith("-emulated")
            db = database_dir(cache.root, f"{profile.id}-emulated" if emulated else profile.id)
            tune_summary = tune_once(art, profile, tcfg, db, cache, progress=options.tune.progress)
            # Trials and the database content key the tuned build: a longer tune is a new artifact.
            tuning = {"trials": tcfg.trials, "remote": tcfg.tracker is not None, "db": database_digest(db)}
        cfg = {"target": profile.tvm_target(), "kernels": profile.kernels.__dict__, "tuning": tuning,
               "kernel_sources": kernel_sources_digest(), **({"batch": options.batch} if options.batch != 1 else {})}

        def write(d: Path) -> tuple[str, dict[str, Any]]:
            meta = build_library(model, profile, d / "model.so", tuning_db=db, batch=options.batch)
            meta["source"] = art.key
            meta["threads"] = profile.bench.threads
            if tuning is not None:
                meta["tuning"] = {**tuning, "measured": tune_summary.get("measured"),
                                  "failed_trials": tune_summary.get("failed"), "database": str(db),
                                  "budget_s": tcfg.budget_s, "elapsed_s": tune_summary.get("elapsed_s"),
                                  "stopped_by_budget": bool(tune_summary.get("stopped_by_budget")),
                                  # tasks short of their trials when the time budget ran out
                                  "uncovered": tune_summary.get("uncovered", [])}
            if auto is not None:
                meta["auto_tuning"] = auto
            return "model.so", meta

        sk = StepKey("compile:tvm", (art.key,), cfg, COMPILE_CONFIG_VERSION, profile.id)
        return cache.get_or_build(sk, "tvm-lib", write)

    def load(self, art: Artifact) -> TvmLibRunner:
        machine = art.meta.get("elf_machine")
        if machine != platform.machine():
            raise UsageError(
                f"artifact {art.key[:12]} is a {machine} library for {art.meta.get('triple')}; "
                "run it on that device (edgec bench --tracker HOST:PORT --key KEY)"
            )
        names = [i["name"] for i in art.meta.get("inputs", [])]
        return TvmLibRunner(art.payload, names, int(art.meta.get("threads", 1)))

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
