"""Benchmark on remote devices through a TVM RPC tracker, and share a list of artifacts over a farm.

Every device registered under the same key pulls work from one queue. Each artifact runs in its own
authenticated session (one tracker request each), so a device that drops mid-run costs only the artifact in
flight: it goes back on the queue and runs on another device; with no other device registered, the run ends
at once with the dropped device named. Results are keyed by artifact, and only the first successful result
per artifact is kept, so none is lost or duplicated.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from toolchain.core.errors import InfraError, UsageError
from toolchain.device.protocol import KIND_FUNCS, DeviceLost, RemoteSpec
from toolchain.device.session import devices, open_session
from toolchain.measure.job import BenchJob, assemble
from toolchain.measure.stats import StatsConfig
from toolchain.measure.timing import Latency, Rounds, latency_of_rounds  # statistics of a device's raw rounds

Event = Callable[[str, str, str], None]  # (event, artifact key, device address)


def run_job(sess: Any, job: BenchJob) -> dict[str, Any]:
    """Upload the job's artifact, have the device time it and run the evaluation inputs, and summarize its raw
    samples here as the local path does (``measure.timing``): a measurement whose p50 interval is too wide is
    taken once more on the device and the second kept."""
    kind = job.art.kind
    fname = KIND_FUNCS.get(kind)
    if fname is None:
        raise UsageError(f"artifact kind {kind!r} cannot run remotely")
    remote_name = f"{job.art.key[:16]}-{job.art.payload.name}"
    cfg = {"shape": list(job.shape), "input_name": job.input_name, "threads": job.cfg.threads,
           "input_names": [i["name"] for i in job.art.meta.get("inputs", [])] or [job.input_name],
           "measure": asdict(job.cfg), "runner_options": job.art.meta.get("runner_options") or {}}
    try:
        sess.upload(str(job.art.payload), target=remote_name)
        fn = sess.get_function(fname)
    except Exception as e:  # noqa: BLE001  (any RPC failure here is a lost connection)
        if _no_such_function(e):
            raise UsageError(f"the device cannot run {kind!r} artifacts ({fname} is not registered there)") from None
        raise DeviceLost(_last_line(e)) from None
    x = bytearray(np.ascontiguousarray(job.x, np.float32).tobytes())

    def measure(**extra: Any) -> tuple[dict[str, Any], Latency]:
        try:
            raw = fn(remote_name, json.dumps({**cfg, **extra}), x)
        except Exception as e:  # noqa: BLE001
            if _no_such_function(e):  # TVM's RPC looks the function up at its first call
                raise UsageError(f"the device cannot run {kind!r} artifacts ({fname} is not registered "
                                 "there)") from None
            raise DeviceLost(_last_line(e)) from None
        got = json.loads(str(raw))
        if "error" in got:
            raise UsageError(f"artifact {job.art.key[:12]} failed on the device: {got['error']}")
        parts = [_f32(b) for b in got.pop("rounds_ms_b64")]
        return got, latency_of_rounds(Rounds(parts, got.pop("warmups")), job.cfg, StatsConfig())

    dev, lat = measure()
    if job.cfg.rerun_unstable and not lat.stable:
        again = measure(measure_only=True)[1]
        rerun = {"reason": "unstable", "first_ci_rel_width": lat.ci_rel_width, "first_p50_ms": lat.p50_ms}
        lat = Latency(**{**again.__dict__, "rerun": rerun})
    dev["latency"], dev["samples_ms"] = lat.to_json(), lat.samples_ms
    dev["outputs"] = _f32(dev.pop("outputs_b64")).reshape(dev.pop("outputs_shape"))
    if getattr(sess, "edgec_device", {}).get("emulated"):  # from the device's authenticated hello
        dev["emulated"] = True
    return dev


def _no_such_function(e: BaseException) -> bool:
    msg = str(e).lower()
    return "not found" in msg or "cannot find" in msg or "has no function" in msg


def _f32(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), np.float32)


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _wait_gone(spec: RemoteSpec, addr: str, wait_s: float = 3.0) -> list[str]:
    """The devices still registered once the tracker has dropped ``addr`` (it notices a closed connection
    within moments), or after ``wait_s``."""
    t_end = time.monotonic() + wait_s
    while True:
        try:
            found = devices(spec)
        except InfraError:
            return []
        if addr not in found or time.monotonic() > t_end:
            return [a for a in found if a != addr]
        time.sleep(0.1)


def bench_many(jobs: list[BenchJob], spec: RemoteSpec, on_event: Event | None = None) -> dict[str, dict[str, Any]]:
    """Benchmark every job on the devices registered under ``spec.key``; {artifact key: result}."""
    if not jobs:
        return {}
    n_dev = len(devices(spec))
    if n_dev == 0:
        raise InfraError(f"no device registered with key {spec.key!r} at tracker "
                         f"{spec.tracker_host}:{spec.tracker_port}; start one with 'edgec device serve'")
    work: queue.Queue[tuple[BenchJob, int]] = queue.Queue()
    for j in jobs:
        work.put((j, 0))
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    pending = [len(jobs)]
    emit = on_event or (lambda *_: None)

    def worker() -> None:
        while True:
            with lock:
                if pending[0] == 0 or errors:
                    return
            try:
                job, attempts = work.get(timeout=0.1)
            except queue.Empty:
                continue  # another worker may still put a failed job back
            key = job.art.key
            sess = None
            addr = "?"
            try:
                sess, addr = open_session(spec)
                emit("start", key, addr)
                dev = run_job(sess, job)
                dev["device"] = f"rpc://{addr} (key {spec.key})"
                with lock:
                    if key not in results:  # first result wins; a late duplicate is dropped
                        results[key] = assemble(job, dev)
                        if dev.get("emulated"):  # its latency is the emulator's, not a device's
                            results[key]["emulated"] = True
                        pending[0] -= 1
                emit("done", key, addr)
            except DeviceLost as e:
                emit("lost", key, addr)
                sess = None  # closes what is left of the session
                if not _wait_gone(spec, addr):
                    with lock:
                        errors.append(InfraError(f"device {addr} dropped during artifact {key[:12]} ({str(e)[:160]}) "
                                                 f"and no other device is registered under key {spec.key!r}; "
                                                 "restart it and rerun"))
                    return
                if attempts + 1 >= spec.max_attempts:
                    with lock:
                        errors.append(InfraError(f"artifact {key[:12]}: devices dropped {attempts + 1} times "
                                                 f"(last: {str(e)[:120]}); check the devices and retry"))
                    return
                work.put((job, attempts + 1))
                time.sleep(0.2)
            except BaseException as e:  # noqa: BLE001  (usage / infra errors end the whole run)
                with lock:
                    errors.append(e)
                return
            finally:
                if sess is not None:
                    del sess  # closes the RPC session; the device goes back to the tracker's pool

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(n_dev, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if len(results) != len(jobs):
        raise InfraError(f"{len(jobs) - len(results)} artifact(s) were not measured; the devices went away")
    return results
