"""Benchmark on remote devices through a TVM RPC tracker, and share a list of artifacts over a farm.

Every device registered under the same key pulls work from one queue. Each artifact runs in its own
RPC session (one tracker request each), so a device that drops mid-run costs only the artifact in
flight: it goes back on the queue and runs on another device. Results are keyed by artifact, and
only the first successful result per artifact is kept, so none is lost or duplicated.
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from toolchain.errors import InfraError, UsageError
from toolchain.remote_server import KIND_FUNCS, mac

Event = Callable[[str, str, str], None]  # (event, artifact key, device address)


@dataclass(frozen=True)
class RemoteSpec:
    """Where the devices are and how long to wait for them."""

    tracker_host: str
    tracker_port: int
    key: str
    token: str
    request_timeout_s: float = 120.0  # waiting for a free device (all busy or all gone)
    session_timeout_s: float = 0.0  # 0: the device never kills a session on its own
    max_attempts: int = 3  # per artifact, across devices

    @staticmethod
    def parse(tracker: str, key: str, token: str | None, **kw: Any) -> RemoteSpec:
        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--tracker {tracker!r} must be HOST:PORT, e.g. 127.0.0.1:9190")
        if not token:
            raise UsageError("remote bench needs the device token; pass --token or set EDGEC_DEVICE_TOKEN")
        return RemoteSpec(host, int(port), key, token, **kw)


class DeviceLost(Exception):
    """The connection to a device broke (it stopped, crashed or the network dropped)."""


def _tracker_call(spec: RemoteSpec, msg: list[Any], timeout: float) -> Any:
    from tvm.rpc import base

    try:
        sock = socket.create_connection((spec.tracker_host, spec.tracker_port), timeout=min(timeout, 10.0))
    except OSError as e:
        raise InfraError(f"cannot reach the RPC tracker at {spec.tracker_host}:{spec.tracker_port} ({e}); "
                         "start it with 'python -m tvm.exec.rpc_tracker' or fix --tracker") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise InfraError(f"{spec.tracker_host}:{spec.tracker_port} is not a TVM RPC tracker; fix --tracker")
        base.sendjson(sock, msg)
        return base.recvjson(sock)
    except TimeoutError:
        raise InfraError(f"no device with key {spec.key!r} became free within {timeout:.0f} s; "
                         "start one with 'edgec device serve' or raise the timeout") from None
    finally:
        sock.close()


def devices(spec: RemoteSpec) -> list[str]:
    """Addresses of the servers registered under ``spec.key``."""
    from tvm.rpc import base

    info = _tracker_call(spec, [base.TrackerCode.SUMMARY], 10.0)
    servers = info[1]["server_info"] if isinstance(info, list) else info.get("server_info", [])
    return [f"{s['addr'][0]}:{s['addr'][1]}" for s in servers if s.get("key") == "server:" + spec.key]


def open_session(spec: RemoteSpec) -> tuple[Any, str]:
    """(authenticated RPC session, device address). Raises InfraError when no device comes, UsageError
    when the device refuses the token."""
    from tvm import rpc
    from tvm.rpc import base

    value = _tracker_call(spec, [base.TrackerCode.REQUEST, spec.key, "", 1], spec.request_timeout_s)
    if value[0] != base.TrackerCode.SUCCESS:
        raise InfraError(f"tracker refused the request for key {spec.key!r}: {value}")
    host, port, matchkey = value[1]
    addr = f"{host}:{port}"
    try:
        sess = rpc.connect(host, port, matchkey, spec.session_timeout_s)
    except Exception as e:
        raise DeviceLost(f"{addr}: {e}") from None
    authenticate(sess, spec.token, addr)
    return sess, addr


def authenticate(sess: Any, token: str, addr: str = "device") -> None:
    try:
        nonce = sess.get_function("edgec.challenge")()
    except Exception as e:
        raise UsageError(f"{addr} is not an edgec device server (no edgec.challenge: {str(e)[:120]}); "
                         "start it with 'edgec device serve'") from None
    try:
        sess.get_function("edgec.auth")(mac(token, str(nonce)))
    except Exception:
        raise UsageError(f"device {addr} refused the token; pass the token it was started with "
                         "(--token or EDGEC_DEVICE_TOKEN)") from None


def run_job(sess: Any, job: Any) -> dict[str, Any]:
    """Upload the job's artifact, run the device's bench function, decode the result."""
    import base64

    kind = job.art.kind
    fname = KIND_FUNCS.get(kind)
    if fname is None:
        raise UsageError(f"artifact kind {kind!r} cannot run remotely")
    remote_name = f"{job.art.key[:16]}-{job.art.payload.name}"
    cfg = {"shape": list(job.shape), "input_name": job.input_name, "threads": job.cfg.threads,
           "input_names": [i["name"] for i in job.art.meta.get("inputs", [])] or [job.input_name],
           "measure": asdict(job.cfg)}
    try:
        sess.upload(str(job.art.payload), target=remote_name)
        fn = sess.get_function(fname)
    except Exception as e:
        if "not authenticated" in str(e) or "refused" in str(e):
            raise UsageError(f"device refused the upload: {str(e)[:200]}") from None
        if "not found" in str(e).lower() or "cannot find" in str(e).lower():
            raise UsageError(f"the device cannot run {kind!r} artifacts ({fname} is not registered there)") from None
        raise DeviceLost(str(e)[:300]) from None
    try:
        raw = fn(remote_name, json.dumps(cfg), bytearray(np.ascontiguousarray(job.x, np.float32).tobytes()))
    except Exception as e:
        raise DeviceLost(str(e)[:300]) from None
    dev = json.loads(str(raw))
    if "error" in dev:
        raise UsageError(f"artifact {job.art.key[:12]} failed on the device: {dev['error']}")
    dev["outputs"] = np.frombuffer(base64.b64decode(dev.pop("outputs_b64")), np.float32).reshape(dev.pop("outputs_shape"))
    return dev


def bench_many(jobs: list[Any], spec: RemoteSpec, on_event: Event | None = None) -> dict[str, dict[str, Any]]:
    """Benchmark every job on the devices registered under ``spec.key``; {artifact key: result}."""
    from toolchain.bench import assemble

    if not jobs:
        return {}
    n_dev = len(devices(spec))
    if n_dev == 0:
        raise InfraError(f"no device registered with key {spec.key!r} at tracker "
                         f"{spec.tracker_host}:{spec.tracker_port}; start one with 'edgec device serve'")
    work: queue.Queue[tuple[Any, int]] = queue.Queue()
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
            try:
                sess, addr = open_session(spec)
                emit("start", key, addr)
                dev = run_job(sess, job)
                dev["device"] = f"rpc://{addr} (key {spec.key})"
                with lock:
                    if key not in results:  # first result wins; a late duplicate is dropped
                        results[key] = assemble(job, dev)
                        pending[0] -= 1
                emit("done", key, addr)
            except DeviceLost as e:
                emit("lost", key, str(e)[:80])
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
