"""MetaSchedule tuning for the TVM target: a persistent database per profile, resumable, in its own process.

- Database: ``<cache>/tuning/<profile>/database_{workload,tuning_record}.json`` (MetaSchedule's
  JSONDatabase). Records are keyed by workload (the fused PrimFunc's structure), so a layer tuned for
  one model is reused by every model with the same layer shape.
- Resumable: MetaSchedule appends each measured batch (``num_trials_per_iter`` candidates) to the JSON
  files as it is committed; a killed run loses at most the batch in flight. A rerun counts the valid
  records already there per task and only tunes what is still short of its budget.
- Isolation: ``tune`` runs ``python -m toolchain.tuning`` in a child process that never imports torch
  (tuning spawns builder workers; torch's thread pools and signal handlers do not mix with them) and
  reads its JSON progress lines into a progress bar.
- Builder timeouts: a busy machine made the default 30 s LocalBuilder time out and store every trial as
  a 1e10 record. The builder timeout is raised, failed records are counted and reported, and after the
  database is applied every PrimFunc is checked for ``tirx.is_scheduled`` (see ``naive_kernels``).
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
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolchain.errors import EdgecError, GateFailure, InfraError, SdkMissing, UsageError

FAILED_LATENCY_S = 1e9  # MetaSchedule stores failed candidates with run_secs of 1e10


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

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise UsageError(f"--tune-trials must be >= 0, got {self.trials}")
        if self.trials_per_batch < 1:
            raise UsageError(f"--batch must be >= 1, got {self.trials_per_batch}")
        if (self.tracker is None) != (self.device_key is None):
            raise UsageError("remote tuning needs both --tracker HOST:PORT and --key KEY")

    def public(self) -> dict[str, Any]:
        """The config without the token: what goes on a command line, into JSON and into reports."""
        return {k: v for k, v in asdict(self).items() if k != "token"}

    def remote_spec(self) -> Any:
        """The toolchain.remote.RemoteSpec of the device to measure on (None: measure locally)."""
        if self.tracker is None or self.device_key is None:
            return None
        from toolchain.remote import RemoteSpec
        from toolchain.remote_server import TOKEN_ENV

        token = self.token or os.environ.get(TOKEN_ENV)
        if not token:
            raise UsageError(f"remote tuning needs the device token; pass --token or set {TOKEN_ENV}")
        return RemoteSpec.parse(self.tracker, self.device_key, token, request_timeout_s=self.runner_timeout_s,
                                session_timeout_s=self.runner_timeout_s)


def database_dir(cache_root: Path, profile_id: str) -> Path:
    return Path(cache_root) / "tuning" / profile_id


def database_digest(db_dir: Path) -> str:
    """Content hash of a database: a tuned build's cache key changes when the database does."""
    import hashlib

    h = hashlib.sha256()
    for name in ("database_workload.json", "database_tuning_record.json"):
        p = db_dir / name
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _open_db(db_dir: Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    db_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(str(db_dir / "database_workload.json"),
                                    str(db_dir / "database_tuning_record.json"), allow_missing=True)


def tunable_module(model_path: Path, profile: Any) -> Any:
    """The module tuning sees: the TVM pipeline up to fusion (hand-written kernels already in place)."""
    import onnx

    from targets.tvm import import_onnx, pipeline

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
    if rule_lanes is not None:
        from kernels.tvm.vector_rule import covers_fully

        if covers_fully(func, rule_lanes):
            return False, mflops
    return True, mflops


def _rule_lanes(profile: Any) -> int | None:
    return profile.kernels.vector_lanes if profile.kernels.vector_rule else None


def heavy_naive_kernels(mod: Any, min_mflops: float, rule_lanes: int | None = None) -> list[tuple[str, float]]:
    """(name, MFLOP) of the PrimFuncs with no hand-written kernel and no schedule that are worth tuning (see
    ``worth_tuning``): the layers that run as naive loops AND matter (a conv, an uncovered matmul).
    (Hand-written kernels are marked scheduled, so ``naive_kernels`` already leaves them out.)"""
    work = [(name, worth_tuning(mod[name], min_mflops, rule_lanes)) for name in naive_kernels(mod)]
    return sorted([(n, m) for n, (worth, m) in work if worth], key=lambda t: -t[1])


def auto_trials(model_path: Path, profile: Any) -> tuple[int, list[tuple[str, float]]]:
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


def run_tuning(model_path: Path, profile: Any, cfg: TuneConfig, db_dir: Path) -> dict[str, Any]:
    """Tune in THIS process (the child); prints JSON progress lines to stdout."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from targets.tvm import tvm_target

    target = tvm_target(profile)
    mod = tunable_module(model_path, profile)
    db = _open_db(db_dir)
    extracted = [t for t in ms.relax_integration.extract_tasks(mod, target)
                 if not _is_hand_written(t.dispatched[0])]
    light: list[Any] = []
    if cfg.min_mflops > 0 and profile.kernels.vector_rule:
        # The vector rule schedules the light and the elementwise tasks: the budget is the heavy layers'.
        extracted = [t for t in extracted
                     if worth_tuning(t.dispatched[0]["main"], cfg.min_mflops, _rule_lanes(profile))[0]]
    elif cfg.min_mflops > 0:
        light = [t for t in extracted if _mflops(t.dispatched[0]) < cfg.min_mflops]
    total = cfg.trials + cfg.trials_per_batch * len(light)
    per_task = cfg.max_trials_per_task or total
    todo, weights, done_before = [], [], 0
    for t in extracted:
        have = _valid_records(db, t.dispatched[0])
        cap = min(per_task, cfg.trials_per_batch) if t in light else per_task
        done_before += min(have, cap)
        if have < cap:
            todo.append(t)
            weights.append(float(t.weight))
    budget = max(0, total - done_before)
    _emit({"event": "start", "tasks": len(extracted), "to_tune": len(todo), "budget": budget,
           "resumed_trials": done_before})
    stats: dict[str, Any] = {"measured": 0, "failed": 0, "first_error": None}
    spec = cfg.remote_spec()  # the parent checked tracker, key and token (see tune)
    if todo and budget > 0:
        work = db_dir / "work"
        ctxs, w = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, str(work))

        from tvm.ir.utils import derived_object

        @derived_object
        class _Progress(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler: Any, task_id: int, candidates: Any, builds: Any, runs: Any) -> None:
                for b, r in zip(builds, runs):
                    stats["measured"] += 1
                    if b.error_msg or r.error_msg:
                        stats["failed"] += 1
                        if stats["first_error"] is None:
                            stats["first_error"] = _last_line(str(b.error_msg or r.error_msg))
                _emit({"event": "progress", "done": stats["measured"], "total": budget,
                       "failed": stats["failed"], "task": todo[task_id].task_name})

        runner: Any
        if spec is not None:
            runner = ms.runner.RPCRunner(
                rpc_config=ms.runner.RPCConfig(tracker_host=spec.tracker_host, tracker_port=spec.tracker_port,
                                               tracker_key=spec.key, session_timeout_sec=int(cfg.runner_timeout_s)),
                # By reference (this file runs as __main__ in the child): the worker imports toolchain.tuning.
                f_create_session=importlib.import_module("toolchain.tuning")._create_session)
        else:
            runner = ms.runner.LocalRunner(timeout_sec=cfg.runner_timeout_s)
        ms.tune.tune_tasks(
            tasks=ctxs, task_weights=w, work_dir=str(work), max_trials_global=budget,
            max_trials_per_task=per_task, num_trials_per_iter=cfg.trials_per_batch,
            builder=_builder(profile, cfg), runner=runner,
            database=db, measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), _Progress()],
        )
    if stats["measured"] and stats["failed"] == stats["measured"]:
        where = f"on device {cfg.device_key!r}" if spec is not None else "on this machine"
        raise InfraError(f"all {stats['measured']} tuning candidates failed {where}: {stats['first_error']}; "
                         f"fix that and rerun to resume from {db_dir}")
    applied = apply_database(mod, target, db_dir)
    if profile.kernels.vector_rule:  # as the compile does: what tuning left, the rule schedules
        from kernels.tvm.vector_rule import schedule_naive

        applied = schedule_naive(applied, profile.kernels.vector_lanes)[0]
    naive = naive_kernels(applied)
    result = {"event": "done", "tasks": len(extracted), "tuned_tasks": len(todo), "measured": stats["measured"],
              "failed": stats["failed"], "first_error": stats["first_error"], "resumed_trials": done_before,
              "naive": naive, "database": str(db_dir), "remote": spec is not None, "config": cfg.public()}
    _emit(result)
    del tvm
    return result


def _preflight(spec: Any) -> str:
    """Open one authenticated session before building anything: a wrong tracker, key or token fails
    now with edgec's one-line error instead of as N failed candidates. Returns the device address."""
    from toolchain.remote import DeviceLost, open_session

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
    from toolchain.remote import RemoteSpec, open_session
    from toolchain.remote_server import TOKEN_ENV

    timeout = float(rpc_config.session_timeout_sec or 60)
    spec = RemoteSpec(rpc_config.tracker_host, int(rpc_config.tracker_port), rpc_config.tracker_key,
                      os.environ.get(TOKEN_ENV, ""), request_timeout_s=timeout, session_timeout_s=timeout)
    return open_session(spec)[0]


def _last_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no message")[:200]


def _builder(profile: Any, cfg: TuneConfig) -> Any:
    """LocalBuilder with a long timeout. For a remote device (a tracker) or a cross profile, every
    candidate is linked into a shared library HERE (with the profile's cross compiler for ARM) so the
    device loads it without a compiler; MetaSchedule's default exports a .tar the loader must link."""
    from tvm.s_tir import meta_schedule as ms

    if not profile.cpu.cross_cc and cfg.tracker is None:
        return ms.builder.LocalBuilder(timeout_sec=cfg.builder_timeout_s, max_workers=1)
    return ms.builder.LocalBuilder(timeout_sec=cfg.builder_timeout_s, max_workers=1,
                                   f_export=candidate_exporter(profile.cpu.cross_cc))


def candidate_exporter(cross_cc: str | None) -> Callable[[Any], str]:
    """The builder's export step for a device: link the candidate into ``edgec-ms-*.so`` with
    ``cross_cc`` (None: the host compiler). Runs in the builder's worker process (pickled by value)."""

    def export(mod: Any) -> str:
        import os
        import tempfile

        from tvm.support import cc

        d = tempfile.mkdtemp(prefix="edgec-ms-")
        path = os.path.join(d, os.path.basename(d) + ".so")  # a unique name: the device logs it
        mod.export_library(path, fcompile=cc.cross_compiler(cross_cc) if cross_cc else cc.create_shared)
        return path

    return export


def _is_hand_written(mod: Any) -> bool:
    import tvm

    return any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "edgec.kernel" in f.attrs
               for f in mod.functions.values())


def apply_database(mod: Any, target: Any, db_dir: Path) -> Any:
    """``mod`` with every PrimFunc the database has a schedule for replaced by its best schedule."""
    from tvm import relax

    db = _open_db(db_dir)
    with target, db:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def naive_kernels(mod: Any) -> list[str]:
    """PrimFuncs left unscheduled (no hand-written kernel, no tuned schedule): they run naive loops."""
    import tvm

    out = []
    for gv, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            attrs = f.attrs or {}
            if not bool(attrs.get("tirx.is_scheduled", False)):
                out.append(gv.name_hint)
    return sorted(out)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


def tune(model_path: Path, profile_id: str, cfg: TuneConfig, db_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Run tuning in a child process (no torch there) with a progress bar; returns its summary."""
    if cfg.trials == 0:
        return {"event": "done", "measured": 0, "failed": 0, "naive": [], "database": str(db_dir)}
    from toolchain.remote_server import TOKEN_ENV

    spec = cfg.remote_spec()  # bad --tracker / missing token: a UsageError before anything starts
    device = _preflight(spec) if spec is not None else None  # wrong key/token: fails in seconds, not N trials
    cmd = [sys.executable, "-m", "toolchain.tuning", "--model", str(model_path), "--profile", profile_id,
           "--db", str(db_dir), "--config", json.dumps(cfg.public())]
    root = str(Path(__file__).resolve().parent.parent)
    # The runner workers import toolchain.tuning (f_create_session): the repo root must be importable.
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    if spec is not None:
        env[TOKEN_ENV] = spec.token
    bar = None
    result: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev.get("event") == "start" and progress:
                from tqdm import tqdm

                bar = tqdm(total=ev["budget"], desc=f"tuning {Path(model_path).stem}", unit="trial",
                           file=sys.stderr)
            elif ev.get("event") == "progress" and bar is not None:
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
        proc.kill()  # an interrupted tune keeps every committed batch in the database
        proc.wait()
        raise
    finally:
        if bar is not None:
            bar.close()
    if failure is not None:  # an edgec error in the child: the same class and one-line message here
        raise _ERRORS.get(str(failure.get("type")), InfraError)(str(failure["message"]))
    if rc != 0 or result is None:
        tail = (err.strip().splitlines() or ["no output"])[-1][:200]
        raise InfraError(f"tuning process failed (exit {rc}): {tail}; rerun to resume from {db_dir}")
    if device is not None:
        result["device"] = f"rpc://{device} (key {cfg.device_key})"
    return result


_ERRORS: dict[str, type[EdgecError]] = {c.__name__: c for c in (UsageError, GateFailure, InfraError, SdkMissing)}


@contextmanager
def tuning_scope(trials: int | None, progress: bool = True, tracker: str | None = None,
                 device_key: str | None = None, token: str | None = None,
                 trials_per_batch: int = 16) -> Iterator[None]:
    """TVM compiles inside this block tune with ``trials`` (no-op for 0 and no tracker); ``None`` is
    "auto": each compile tunes with the profile's budget only where a heavy layer has no hand-written kernel."""
    if trials is None:
        from targets.tvm import tuning_budget

        cfg = TuneConfig(trials=0, tracker=tracker, device_key=device_key, token=token,
                         trials_per_batch=trials_per_batch, auto=True)
        with tuning_budget(cfg, progress):
            yield
        return
    if trials <= 0:
        if trials < 0:
            raise UsageError(f"--tune-trials must be >= 0, got {trials}")
        yield
        return
    from targets.tvm import tuning_budget

    cfg = TuneConfig(trials=trials, tracker=tracker, device_key=device_key, token=token,
                     trials_per_batch=trials_per_batch)
    with tuning_budget(cfg, progress):
        yield


def main(argv: list[str] | None = None) -> int:
    from toolchain.profile import load_profile

    ap = argparse.ArgumentParser(prog="python -m toolchain.tuning")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--config", required=True)
    a = ap.parse_args(argv)
    try:
        cfg = TuneConfig(**json.loads(a.config))
        run_tuning(a.model, load_profile(a.profile), cfg, a.db)
    except EdgecError as e:  # the parent re-raises it with the same class and message
        _emit({"event": "error", "type": type(e).__name__, "message": str(e)})
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
