"""MetaSchedule tuning for the TVM target: a persistent database per profile, resumable, in its own process.

- Database: one per profile (``targets.tvm.database``), shared by every model with the same layers.
- Resumable: MetaSchedule appends each measured batch (``num_trials_per_iter`` candidates) to the JSON
  files as it is committed; a killed run loses at most the batch in flight. A rerun counts the valid
  records already there per task and only tunes what is still short of its budget.
- Isolation: ``tune`` runs ``python -m targets.tvm.tuning`` in a child process that never imports torch
  (tuning spawns builder workers; torch's thread pools and signal handlers do not mix with them) and
  reads its JSON progress lines into a progress bar.
- Builder timeouts: a busy machine made the default 30 s LocalBuilder time out and store every trial as
  a 1e10 record. The builder timeout is raised, failed records are counted and reported, and after the
  database is applied every PrimFunc is checked for ``tirx.is_scheduled`` (see ``naive_kernels``).
- Hand-written conv layers compete (local, host-native runs): their generic form is tuned after the layers that run
  naive, then ``tune`` times each conv layer alone with its tuned schedule and with the direct kernel, interleaved,
  and records the faster per layer in the database (``targets.tvm.conv_choice``); the build keeps the choice. Under a
  time budget the comparisons get ``COMPARE_SHARE`` of it, and the batches a smaller evolutionary search.
- Candidates are linked exactly as the final library is (``targets.tvm.build.library_linker``).
- Remote profiles measure on the device through TVM RPC, never on the build host: the builder links
  every candidate into a shared library on the host (the profile's cross compiler for ARM), and
  MetaSchedule's RPCRunner asks the tracker for a device under ``--key``, does edgec's token handshake
  (``f_create_session``), uploads the library, and times it there. A preflight session (in the parent,
  before the child starts) checks the tracker, key and token, so a wrong token fails in seconds.
  The token travels to the child and the runner workers in ``$EDGEC_DEVICE_TOKEN``, never on a
  command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from kernels.tvm.schedule.vector_rule import covers_fully, schedule_naive
from targets.base import TuneOptions
from targets.tvm.build import library_linker
from targets.tvm.conv_choice import COMPARE_S, ConvLayer, compare, conv_layers, conv_tasks
from targets.tvm.database import apply_database, naive_kernels, open_database, record_kernel_choices
from targets.tvm.frontend import import_onnx, tvm_target
from targets.tvm.pipeline import pipeline
from toolchain.core.cache import Artifact, Cache, StepKey
from toolchain.core.errors import EdgecError, GateFailure, InfraError, SdkMissing, UsageError
from toolchain.core.profile import Profile, load_profile
from toolchain.device.protocol import TOKEN_ENV, DeviceLost, RemoteSpec, token_from_env
from toolchain.device.session import open_session

FAILED_LATENCY_S = 1e9  # MetaSchedule stores failed candidates with run_secs of 1e10
# The first batch under a time budget is assumed to take FIRST_BATCH_S + FIRST_TRIAL_S per trial (stack facts: a
# trial measures in 0.9 s idle, ~2 s with the other core busy; every batch also runs the evolutionary search, ~20 s
# on an idle machine, minutes on an overloaded one). Later batches are estimated from the slowest one so far.
FIRST_BATCH_S = 20.0
FIRST_TRIAL_S = 2.0
# The parent kills a tuning process still running this long after its deadline (a batch that overran its
# estimate); the records of every finished batch stay in the database.
DEADLINE_GRACE_S = 10.0
# Under a time budget, the share kept for comparing each conv layer's tuned schedule with the hand-written kernel.
COMPARE_SHARE = 0.3


@dataclass(frozen=True)
class TuneConfig:
    """One tuning run."""

    trials: int  # global trial budget for the model
    max_trials_per_task: int | None = None  # default: trials (the scheduler spreads them by weight)
    trials_per_batch: int = 16  # a kill loses at most this many measurements
    builder_timeout_s: float = 300.0
    runner_timeout_s: float = 60.0
    tracker: str | None = None  # "host:port" of a TVM RPC tracker: measure on the device
    device_key: str | None = None
    # Device token for remote tuning (default $EDGEC_DEVICE_TOKEN); kept out of repr, JSON and cache keys.
    token: str | None = field(default=None, repr=False, compare=False)
    # "auto" (the CLI default): the compile decides -- the profile's tuning.auto_trials where a heavy layer has
    # no hand-written kernel (see heavy_naive_kernels), nothing otherwise. ``trials`` is ignored then.
    auto: bool = False
    # With min_mflops > 0 (auto mode: the profile's tuning.auto_min_mflops), ``trials`` is the budget of the heavy
    # tasks. The lighter ones (elementwise, norms, pooling) are not tuned where the profile's vector rule schedules
    # them (kernels.vector_rule); without the rule each gets one batch on top (trials_per_batch). Measured on
    # convkan: 96 trials over all 10 tasks left some untuned (1.11x ORT); the 2 convs only, with the 8 light
    # kernels naive: 1.23x; with one batch per light kernel: 0.93x but 12 min; convs only + rule: see BENCHMARKS.md.
    min_mflops: float = 0.0
    # Wall-clock limit of the whole tuning run in seconds (auto mode: the profile's tuning.auto_budget_s; None: no
    # limit). Batches start only while they fit; what is left short is reported as "uncovered".
    budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise UsageError(f"--tune-trials must be >= 0, got {self.trials}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise UsageError(f"the tuning time budget must be > 0 seconds, got {self.budget_s}")
        if self.trials_per_batch < 1:
            raise UsageError(f"--batch must be >= 1, got {self.trials_per_batch}")
        if (self.tracker is None) != (self.device_key is None):
            raise UsageError("remote tuning needs both --tracker HOST:PORT and --key KEY")

    def public(self) -> dict[str, Any]:
        """The config without the token: what goes on a command line, into JSON and into reports."""
        return {k: v for k, v in asdict(self).items() if k != "token"}

    @staticmethod
    def from_options(opts: TuneOptions) -> TuneConfig | None:
        """The tuning a compile's options ask for (None: no tuning at all)."""
        if opts.trials is not None and opts.trials < 0:
            raise UsageError(f"--tune-trials must be >= 0, got {opts.trials}")
        if opts.trials == 0:
            return None
        return TuneConfig(trials=opts.trials or 0, tracker=opts.tracker, device_key=opts.device_key,
                          token=opts.token, trials_per_batch=opts.trials_per_batch, auto=opts.trials is None)

    def remote_spec(self) -> RemoteSpec | None:
        """The device to measure on (None: measure locally)."""
        if self.tracker is None or self.device_key is None:
            return None
        token = token_from_env(self.token)
        if not token:
            raise UsageError(f"remote tuning needs the device token; pass --token or set {TOKEN_ENV}")
        return RemoteSpec.parse(self.tracker, self.device_key, token, request_timeout_s=self.runner_timeout_s,
                                session_timeout_s=self.runner_timeout_s)


def tunable_module(model_path: Path, profile: Profile) -> Any:
    """The module tuning sees: the TVM pipeline up to fusion (hand-written kernels already in place)."""
    mod = import_onnx(onnx.load(str(model_path)))
    for name, step in pipeline(profile):
        mod = step(mod)
        if name == "legalize-and-fuse":
            return mod
    raise InfraError("internal: the TVM pipeline has no legalize-and-fuse step")


def _mflops(mod: Any) -> float:
    """TVM's FLOP estimate of a one-function IRModule, in MFLOP (inf where the estimator cannot read it)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod)) / 1e6
    except Exception:  # noqa: BLE001 -- a loop nest the estimator cannot read: count it as heavy
        return float("inf")


def worth_tuning(func: Any, min_mflops: float, rule_lanes: int | None) -> tuple[bool, float]:
    """(whether tuning ``func`` pays, its MFLOP): at least ``min_mflops`` of work, and (with the vector rule
    on, ``rule_lanes``) not a purely elementwise kernel the rule schedules as well as tuning would.
    Elementwise ops and norms below the bar cost minutes of tuning to gain microseconds."""
    import tvm

    mflops = _mflops(tvm.IRModule({"main": func}))
    if mflops < min_mflops:
        return False, mflops
    if rule_lanes is not None and (covers_fully(func, rule_lanes) or _rule_pools(func, rule_lanes)):
        return False, mflops
    return True, mflops


def _rule_pools(func: Any, lanes: int) -> bool:
    """Whether ``func`` is a window reduction over one tensor with no weights (max / average pooling, a mean)
    that the vector rule schedules: the rule's loop order (window inside, the last spatial axis vectorized) is
    what such a kernel needs; tuning one cost the full "auto" budget for ResNet-18's max pool (1.8 MFLOP)."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return False
    for info in infos:
        block = sch.get(info.block_rv)
        # TVM 0.27: block reads / writes are TensorRegions, the buffer in ``source``
        written = {w.source for w in block.writes}
        if "R" in info.dom_kind() and len({r.source for r in block.reads} - written) > 1:
            return False  # a reduction reading two tensors: a conv or matmul (data x weights)
    return bool(schedule_naive(tvm.IRModule({"main": func}), lanes)[1])


def _rule_lanes(profile: Profile) -> int | None:
    return profile.kernels.vector_lanes if profile.kernels.vector_rule else None


def heavy_naive_kernels(mod: Any, min_mflops: float, rule_lanes: int | None = None) -> list[tuple[str, float]]:
    """(name, MFLOP) of the PrimFuncs with no hand-written kernel and no schedule that are worth tuning (see
    ``worth_tuning``): the layers that run as naive loops AND matter (a conv, an uncovered matmul).
    (Hand-written kernels are marked scheduled, so ``naive_kernels`` already leaves them out.)"""
    work = [(name, worth_tuning(mod[name], min_mflops, rule_lanes)) for name in naive_kernels(mod)]
    return sorted([(n, m) for n, (worth, m) in work if worth], key=lambda t: -t[1])


def auto_trials(model_path: Path, profile: Profile) -> tuple[int, list[tuple[str, float]]]:
    """The default tuning budget for this model on this profile: (trials, the heavy naive kernels that
    call for them). 0 trials where hand-written kernels (and the vector rule) cover every heavy layer."""
    heavy = heavy_naive_kernels(tunable_module(model_path, profile), profile.tuning.auto_min_mflops,
                                _rule_lanes(profile))
    return (profile.tuning.auto_trials if heavy else 0), heavy


def _valid_records(db: Any, mod: Any) -> int:
    import tvm

    if not db.has_workload(mod):
        return 0
    recs = db.get_top_k(db.commit_workload(mod), 10**6)
    ok = 0
    for r in recs:
        secs = [float(s) for s in (r.run_secs or [])]
        if secs and max(secs) < FAILED_LATENCY_S:
            ok += 1
    del tvm
    return ok


@dataclass
class _TaskPlan:
    """One task's share of a tuning run: valid records already in the database, trials it should reach."""

    task: Any
    name: str
    mflops: float
    have: int  # valid records in the database before this run
    want: int  # trials it should have when the run is done (its cap)
    done: int = 0  # trials measured in this run
    exhausted: bool = False  # a batch measured nothing new: its search space is spent

    @property
    def short(self) -> int:
        return 0 if self.exhausted else max(0, self.want - self.have - self.done)

    def uncovered(self) -> dict[str, Any]:
        return {"task": self.name, "mflops": round(self.mflops, 2), "trials": self.have + self.done,
                "wanted": self.want}


def run_tuning(model_path: Path, profile: Profile, cfg: TuneConfig, db_dir: Path,
               deadline: float | None = None) -> dict[str, Any]:
    """Tune in THIS process (the child); prints JSON progress lines to stdout.

    Tasks are tuned one batch (``trials_per_batch`` candidates) at a time, round robin over the tasks short of
    their trials, heaviest first (weight x MFLOP), each batch a ``tune_tasks`` call of its own that starts from
    the best records in the database and shares one cost model with the others. With a ``deadline`` (a
    ``time.time()``, from the budget), a batch starts only when its estimated duration (the slowest batch so
    far, scaled to its size) ends before it; the tasks still short when it stops are reported as
    ``uncovered`` (they keep the vector rule or naive loops)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    t_start = time.time()
    target = tvm_target(profile)
    mod = tunable_module(model_path, profile)
    db = open_database(db_dir)
    extracted = [t for t in ms.relax_integration.extract_tasks(mod, target)
                 if not _is_hand_written(t.dispatched[0])]
    light: list[Any] = []
    if cfg.min_mflops > 0 and profile.kernels.vector_rule:
        # The vector rule schedules the light and the elementwise tasks: the budget is the heavy layers'.
        extracted = [t for t in extracted
                     if worth_tuning(t.dispatched[0]["main"], cfg.min_mflops, _rule_lanes(profile))[0]]
    elif cfg.min_mflops > 0:
        light = [t for t in extracted if _mflops(t.dispatched[0]) < cfg.min_mflops]
    # The hand-written conv layers compete: their generic form is tuned too (after the layers that run naive),
    # then each layer is timed both ways and the faster is recorded (targets.tvm.conv_choice). Measured here,
    # so only where the candidates run on this machine.
    import tvm_ffi

    layers = conv_layers(onnx.load(str(model_path)), profile, cfg.min_mflops) \
        if cfg.tracker is None and profile.is_host_native else []
    seen = {tvm_ffi.structural_hash(t.dispatched[0]) for t in extracted}
    competitors: set[int] = set()
    for layer in layers:
        for t in conv_tasks(layer, profile):
            h = tvm_ffi.structural_hash(t.dispatched[0])
            if h not in seen:
                seen.add(h)
                extracted.append(t)
                competitors.add(id(t))
    total = cfg.trials + cfg.trials_per_batch * len(light)
    per_task = cfg.max_trials_per_task or total
    plans: list[_TaskPlan] = []
    done_before = 0
    for t in extracted:
        have = _valid_records(db, t.dispatched[0])
        cap = min(per_task, cfg.trials_per_batch) if t in light else per_task
        done_before += min(have, cap)
        if have < cap:
            plans.append(_TaskPlan(t, t.task_name, _mflops(t.dispatched[0]), have, cap))
    plans.sort(key=lambda p: (id(p.task) in competitors,
                              -float(p.task.weight) * (p.mflops if p.mflops != float("inf") else 1e12)))
    budget = max(0, total - done_before)
    _emit({"event": "start", "tasks": len(extracted), "to_tune": len(plans), "budget": budget,
           "resumed_trials": done_before, "plan": [p.uncovered() for p in plans]})
    stats: dict[str, Any] = {"measured": 0, "failed": 0, "first_error": None, "task": ""}
    spec = cfg.remote_spec()  # the parent checked tracker, key and token (see tune)
    stopped = False
    if plans and budget > 0:
        work = db_dir / "work"
        from tvm.ir.utils import derived_object

        @derived_object
        class _Progress(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler: Any, task_id: int, candidates: Any, builds: Any, runs: Any) -> None:
                for b, r in zip(builds, runs, strict=True):
                    stats["measured"] += 1
                    if b.error_msg or r.error_msg:
                        stats["failed"] += 1
                        if stats["first_error"] is None:
                            stats["first_error"] = _last_line(str(b.error_msg or r.error_msg))
                _emit({"event": "progress", "done": stats["measured"], "total": budget,
                       "failed": stats["failed"], "task": stats["task"]})

        runner: Any
        if spec is not None:
            runner = ms.runner.RPCRunner(
                rpc_config=ms.runner.RPCConfig(tracker_host=spec.tracker_host, tracker_port=spec.tracker_port,
                                               tracker_key=spec.key, session_timeout_sec=int(cfg.runner_timeout_s)),
                # By reference (this file runs as __main__ in the child): the worker imports toolchain.tuning.
                f_create_session=importlib.import_module("targets.tvm.tuning")._create_session)
        else:
            runner = ms.runner.LocalRunner(timeout_sec=cfg.runner_timeout_s)
        builder = _builder(profile, cfg)
        cost_model = ms.CostModel.create("xgb", num_tuning_cores=max(1, profile.cpu.num_cores), tree_method="auto")
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _Progress()]
        stopped = _tune_batches(plans, budget, cfg.trials_per_batch, deadline, work, builder, runner, db,
                                cost_model, callbacks, stats)
    if stats["measured"] and stats["failed"] == stats["measured"]:
        where = f"on device {cfg.device_key!r}" if spec is not None else "on this machine"
        raise InfraError(f"all {stats['measured']} tuning candidates failed {where}: {stats['first_error']}; "
                         f"fix that and rerun to resume from {db_dir}")
    applied = apply_database(mod, target, db_dir)
    if profile.kernels.vector_rule:  # as the compile does: what tuning left, the rule schedules
        applied = schedule_naive(applied, profile.kernels.vector_lanes)[0]
    naive = naive_kernels(applied)
    result = {"event": "done", "tasks": len(extracted), "tuned_tasks": sum(1 for p in plans if p.done),
              "measured": stats["measured"], "failed": stats["failed"], "first_error": stats["first_error"],
              "resumed_trials": done_before, "naive": naive, "database": str(db_dir), "remote": spec is not None,
              "config": cfg.public(), "elapsed_s": round(time.time() - t_start, 1),
              "stopped_by_budget": stopped, "uncovered": [p.uncovered() for p in plans if p.short > 0]}
    _emit(result)
    del tvm
    return result


def choose_conv_kernels(layers: list[ConvLayer], profile: Profile, db_dir: Path,
                        deadline: float | None) -> dict[str, dict[str, Any]]:
    """Per conv layer (heaviest first, while a comparison still fits before ``deadline``): the hand-written kernel
    vs the tuned schedule, timed interleaved; each choice is recorded in the database as soon as it is made (a
    run killed at its deadline keeps the ones before). Layers not compared keep the hand-written kernel."""
    choices: dict[str, dict[str, Any]] = {}
    for layer in layers:
        if deadline is not None and time.time() + COMPARE_S > deadline:
            _emit({"event": "budget", "stopped_before": f"comparing {layer.key}",
                   "left_s": round(deadline - time.time(), 1)})
            break
        rec = compare(layer, profile, db_dir)
        choices[layer.key] = rec
        record_kernel_choices(db_dir, {layer.key: rec})
        _emit({"event": "kernel_choice", "layer": layer.key, **rec})
    return choices


def _tune_batches(plans: list[_TaskPlan], budget: int, batch: int, deadline: float | None, work: Path,
                  builder: Any, runner: Any, db: Any, cost_model: Any, callbacks: list, stats: dict[str, Any]) -> bool:
    """Round robin over ``plans``, one batch of at most ``batch`` trials per task per round, until ``budget``
    trials ran, every task has its trials, or (``deadline``) the next batch would not end in time. Returns
    whether the deadline stopped it."""
    from tvm.s_tir import meta_schedule as ms

    left = budget
    slowest: float | None = None  # seconds of the slowest batch so far, per trial of the batch size
    while left > 0 and any(p.short for p in plans):
        for p in plans:
            n = min(batch, p.short, left)
            if n <= 0:
                continue
            estimate = slowest * batch if slowest is not None else FIRST_BATCH_S + n * FIRST_TRIAL_S
            if deadline is not None and time.time() + estimate > deadline:
                _emit({"event": "budget", "stopped_before": p.name, "left_s": round(deadline - time.time(), 1)})
                return True
            stats["task"] = p.name
            before = stats["measured"]
            t0 = time.time()
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts([p.task], str(work),
                                                                                  strategy=_strategy(deadline))
            ms.tune.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=str(work), max_trials_global=n,
                               max_trials_per_task=n, num_trials_per_iter=n, builder=builder, runner=runner,
                               database=db, cost_model=cost_model, measure_callbacks=callbacks,
                               task_scheduler="round-robin")
            got = stats["measured"] - before
            p.done += got
            p.exhausted = got == 0
            left -= max(got, 1)
            slowest = max((time.time() - t0) / max(n, 1), slowest or 0.0)
            _emit({"event": "batch", "task": p.name, "trials": got, "seconds": round(time.time() - t0, 1)})
            if left <= 0:
                break
    return False


def _strategy(deadline: float | None) -> Any:
    """MetaSchedule's search for one batch. Under a time budget, a smaller evolutionary search (a population of
    128 evolved twice instead of 512 evolved 4 times): on a busy 2-core machine the default search alone took
    ~100 s per batch, and a 300 s budget ended inside the first batch with nothing measured."""
    from tvm.s_tir import meta_schedule as ms

    if deadline is None:
        return "evolutionary"
    return ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=16, genetic_num_iters=2)


def _preflight(spec: RemoteSpec) -> str:
    """Open one authenticated session before building anything: a wrong tracker, key or token fails
    now with edgec's one-line error instead of as N failed candidates. Returns the device address."""
    try:
        sess, addr = open_session(spec)
    except DeviceLost as e:
        raise InfraError(f"the device for key {spec.key!r} dropped the connection ({str(e)[:120]}); "
                         "check 'edgec device serve' there and rerun") from None
    del sess  # closes the session; the device goes back to the tracker's pool
    return addr


def _create_session(rpc_config: Any) -> Any:
    """RPCRunner's ``f_create_session``: a tracker session on an edgec device, token handshake done.
    Runs in MetaSchedule's runner worker process, which inherits $EDGEC_DEVICE_TOKEN from the tuning child."""
    timeout = float(rpc_config.session_timeout_sec or 60)
    spec = RemoteSpec(rpc_config.tracker_host, int(rpc_config.tracker_port), rpc_config.tracker_key,
                      os.environ.get(TOKEN_ENV, ""), request_timeout_s=timeout, session_timeout_s=timeout)
    return open_session(spec)[0]


def _last_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no message")[:200]


def _builder(profile: Profile, cfg: TuneConfig) -> Any:
    """LocalBuilder with a long timeout. For a remote device (a tracker) or a cross profile, every
    candidate is linked into a shared library HERE, exactly as the final build links the library
    (``library_linker``: the cross compiler for ARM Linux, clang + lld for the Android triple), so the device
    loads it without a compiler and what is timed is what ships; MetaSchedule's default exports a .tar the
    loader must link."""
    from tvm.s_tir import meta_schedule as ms

    if not profile.cpu.cross_cc and profile.os != "android" and cfg.tracker is None:
        return ms.builder.LocalBuilder(timeout_sec=cfg.builder_timeout_s, max_workers=1)
    compiler, options = library_linker(profile)
    return ms.builder.LocalBuilder(timeout_sec=cfg.builder_timeout_s, max_workers=1,
                                   f_export=candidate_exporter(compiler, options))


def candidate_exporter(compiler: str | None, options: Sequence[str] = ()) -> Callable[[Any], str]:
    """The builder's export step for a device: link the candidate into ``edgec-ms-*.so`` with ``compiler``
    and ``options`` (None: the host compiler; see ``library_linker``). Runs in the builder's worker process
    (pickled by value)."""
    link_options = list(options)

    def export(mod: Any) -> str:
        import os
        import tempfile

        from tvm.support import cc

        d = tempfile.mkdtemp(prefix="edgec-ms-")
        path = os.path.join(d, os.path.basename(d) + ".so")  # a unique name: the device logs it
        fcompile = cc.cross_compiler(compiler, options=link_options) if compiler else cc.create_shared
        mod.export_library(path, fcompile=fcompile)
        return path

    return export


def _is_hand_written(mod: Any) -> bool:
    import tvm

    return any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "edgec.kernel" in f.attrs
               for f in mod.functions.values())


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


def tune(model_path: Path, profile_id: str, cfg: TuneConfig, db_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Run tuning in a child process (no torch there) with a progress bar, then (locally, for a model with direct
    conv layers) compare each conv layer's tuned schedule with the hand-written kernel here and record the choices
    (``conv_choices`` in the summary). Under a time budget the comparisons get ``COMPARE_SHARE`` of it (at most
    ``COMPARE_S`` per conv): the tuning child's deadline is that much earlier. Returns the summary."""
    if cfg.trials == 0:
        return {"event": "done", "measured": 0, "failed": 0, "naive": [], "database": str(db_dir)}
    t_start = time.time()
    spec = cfg.remote_spec()  # bad --tracker / missing token: a UsageError before anything starts
    device = _preflight(spec) if spec is not None else None  # wrong key/token: fails in seconds, not N trials
    profile = load_profile(profile_id)
    convs = _direct_conv_count(model_path, profile) if spec is None and profile.is_host_native else 0
    deadline = t_start + cfg.budget_s if cfg.budget_s is not None else None
    tune_deadline = deadline
    if deadline is not None and convs and cfg.budget_s is not None:
        tune_deadline = deadline - min(COMPARE_SHARE * cfg.budget_s, COMPARE_S * convs)
    result = _tune_child(model_path, profile_id, cfg, db_dir, spec, tune_deadline, t_start, progress)
    if convs:
        layers = conv_layers(onnx.load(str(model_path)), profile, cfg.min_mflops)
        result["conv_choices"] = choose_conv_kernels(layers, profile, db_dir, deadline)
        result["elapsed_s"] = round(time.time() - t_start, 1)
    if device is not None:
        result["device"] = f"rpc://{device} (key {cfg.device_key})"
    return result


def _direct_conv_count(model_path: Path, profile: Profile) -> int:
    """How many Conv nodes of ``model_path`` the direct conv kernels can take (a constant weight, groups 1 or one
    input channel per group), where the profile has them (0 otherwise): an upper bound, read without TVM."""
    if not profile.kernels.use_direct_conv:
        return 0
    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name: list(i.dims) for i in graph.initializer}
    count = 0
    for n in graph.node:
        groups = next((int(a.i) for a in n.attribute if a.name == "group"), 1)
        dims = weights.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if dims is not None and len(dims) == 4 and (groups == 1 or dims[1] == 1):
            count += 1
    return count


def _tune_child(model_path: Path, profile_id: str, cfg: TuneConfig, db_dir: Path, spec: RemoteSpec | None,
                deadline: float | None, t_start: float, progress: bool) -> dict[str, Any]:
    """The tuning process: started, followed (progress bar), killed with its workers at ``deadline`` + grace."""
    cmd = [sys.executable, "-m", "targets.tvm.tuning", "--model", str(model_path), "--profile", profile_id,
           "--db", str(db_dir), "--config", json.dumps(cfg.public())]
    if deadline is not None:
        cmd += ["--deadline", repr(deadline)]
    root = str(Path(__file__).resolve().parents[2])
    # The runner workers import targets.tvm.tuning (f_create_session): the repo root must be importable.
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    if spec is not None:
        env[TOKEN_ENV] = spec.token
    bar = None
    result: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    plan: list[dict[str, Any]] = []
    tuned: dict[str, int] = {}
    measured = 0
    # Its own process group: a kill at the deadline takes MetaSchedule's builder / runner workers with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root,
                            start_new_session=True)
    killer = None
    if deadline is not None:
        killer = threading.Timer(max(0.0, deadline - time.time()) + DEADLINE_GRACE_S, _kill_group, (proc,))
        killer.daemon = True
        killer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev.get("event") == "start":
                plan = list(ev.get("plan", []))
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=ev["budget"], desc=f"tuning {Path(model_path).stem}", unit="trial",
                               file=sys.stderr)
            elif ev.get("event") == "batch":
                tuned[str(ev["task"])] = tuned.get(str(ev["task"]), 0) + int(ev["trials"])
            elif ev.get("event") == "progress":
                measured = int(ev["done"])
                if bar is not None:
                    bar.n = min(ev["done"], bar.total)
                    bar.set_postfix(failed=ev["failed"])
                    bar.refresh()
            elif ev.get("event") == "done":
                result = ev
            elif ev.get("event") == "error":
                failure = ev
        err = proc.stderr.read() if proc.stderr else ""
        rc = proc.wait()
    except BaseException:
        _kill_group(proc)  # an interrupted tune keeps every committed batch in the database
        proc.wait()
        raise
    finally:
        if killer is not None:
            killer.cancel()
        if bar is not None:
            bar.close()
    if deadline is not None and result is None and failure is None and time.time() >= deadline:
        # Killed at the deadline in the middle of a batch: what the finished batches covered is in the database.
        uncovered = [{**p, "trials": p["trials"] + tuned.get(p["task"], 0)} for p in plan
                     if p["trials"] + tuned.get(p["task"], 0) < p["wanted"]]
        return {"event": "done", "measured": measured, "failed": None, "naive": None, "database": str(db_dir),
                "config": cfg.public(), "elapsed_s": round(time.time() - t_start, 1),
                "stopped_by_budget": True, "killed_at_deadline": True, "uncovered": uncovered}
    if failure is not None:  # an edgec error in the child: the same class and one-line message here
        raise _ERRORS.get(str(failure.get("type")), InfraError)(str(failure["message"]))
    if rc != 0 or result is None:
        tail = (err.strip().splitlines() or ["no output"])[-1][:200]
        raise InfraError(f"tuning process failed (exit {rc}): {tail}; rerun to resume from {db_dir}")
    return result



def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the tuning process and everything it started (its session's process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def tune_once(art: Artifact, profile: Profile, tcfg: TuneConfig, db: Path, cache: Cache,
              progress: bool = True) -> dict[str, Any]:
    """Tune, unless this model already ran this budget to completion against this database. The
    database only grows, so a finished run stays finished; a cached marker records it, with the size of
    the records file then (a deleted or truncated database tunes again). Without the marker every
    compile of a tuned model started the tuning process just to find nothing left to do."""
    records = db / "database_tuning_record.json"
    size = records.stat().st_size if records.is_file() else 0
    run_cfg = {k: v for k, v in tcfg.public().items() if k not in ("builder_timeout_s", "runner_timeout_s")}
    sk = StepKey("tvm-tuning-run", (art.key,), run_cfg, 1, profile.id)
    done = cache.get(sk.digest())
    if done is not None and size >= int(done.meta["records_bytes"]):
        return {**done.meta["summary"], "measured": 0, "skipped": "this budget already ran for this model"}
    if done is not None:
        shutil.rmtree(done.dir, ignore_errors=True)  # stale: the database lost records since
    summary = tune(art.payload, profile.id, tcfg, db, progress=progress)

    def write(d: Path) -> tuple[str, dict[str, Any]]:
        (d / "summary.json").write_text(json.dumps(summary, default=str))
        return "summary.json", {"summary": summary,
                                "records_bytes": records.stat().st_size if records.is_file() else 0}

    cache.get_or_build(sk, "tvm-tuning-run", write)
    return summary


def plan_auto_tuning(tcfg: TuneConfig, art: Artifact, profile: Profile, cache: Cache,
                     compile_key: dict[str, Any]) -> tuple[TuneConfig | None, dict[str, Any]]:
    """Resolve "auto" tuning: the profile's trials where heavy layers run naive, else none. A cross
    profile without a device to measure on is not tuned (its heavy layers are reported instead).
    The decision needs the model imported and lowered to fused kernels (seconds), and the compile's
    cache key depends on it, so it is a cached step of its own: a repeated build stays all cache hits.
    ``compile_key``: what else decides the lowering (kernel sources, compile config version)."""

    def write(d: Path) -> tuple[str, dict[str, Any]]:
        trials, heavy = auto_trials(art.payload, profile)
        plan = {"trials": trials, "heavy_naive": [[n, round(m, 2)] for n, m in heavy]}
        (d / "plan.json").write_text(json.dumps(plan))
        return "plan.json", plan

    sk = StepKey("tvm-auto-tuning-plan", (art.key,), {"tuning": profile.tuning.__dict__,
                 "kernels": profile.kernels.__dict__, "kernel_sources": compile_key["kernel_sources"]},
                 int(compile_key["version"]), profile.id)
    plan_art, _ = cache.get_or_build(sk, "json", write)
    info: dict[str, Any] = json.loads(plan_art.payload.read_text())
    trials = int(info["trials"])
    if trials and not profile.is_host_native and tcfg.tracker is None:
        info.update(trials=0, skipped="no device to measure on: pass --tracker HOST:PORT --key KEY")
        return None, info
    if not trials:
        return None, info
    info["budget_s"] = profile.tuning.auto_budget_s
    return dataclasses.replace(tcfg, trials=trials, auto=False, min_mflops=profile.tuning.auto_min_mflops,
                               budget_s=profile.tuning.auto_budget_s), info


_ERRORS: dict[str, type[EdgecError]] = {c.__name__: c for c in (UsageError, GateFailure, InfraError, SdkMissing)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m targets.tvm.tuning")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--deadline", type=float, help="time.time() by which the run must end")
    a = ap.parse_args(argv)
    try:
        cfg = TuneConfig(**json.loads(a.config))
        run_tuning(a.model, load_profile(a.profile), cfg, a.db, a.deadline)
    except EdgecError as e:  # the parent re-raises it with the same class and message
        _emit({"event": "error", "type": type(e).__name__, "message": str(e)})
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
