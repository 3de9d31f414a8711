"""The lean device runtime: what runs on a Raspberry Pi, a Jetson, a phone-class board or an emulated device.

It serves benchmark sessions behind a TVM RPC tracker, authenticates every connection with edgec's handshake
(``device.protocol``) before TVM sees a byte, loads an uploaded artifact, times it with edgec's one timing
path (its rounds and warm-up) and returns the raw samples and the outputs. It imports only the standard
library, numpy, TVM's runtime (onnxruntime when present, for ``ort-model`` artifacts; tensorrt when present
with a GPU, for ``trt-onnx`` artifacts, whose engines it builds and caches here) and edgec's own
standard-library-and-numpy modules (``core.errors``, ``core.versions``, ``device.protocol``,
``measure.timing``): no torch, no onnx, no scipy, no compiler side. Python >= 3.10. It times; the client
computes the statistics from the raw samples it returns.

    EDGEC_DEVICE_TOKEN=... python3 -m toolchain.device.runtime --tracker HOST:9190 --key rpi5 --host 0.0.0.0

Sessions: one at a time (the tracker hands a device to one client), each in a process forked from this one
(no interpreter is re-executed, so it also runs under qemu-user without binfmt). A session that crashes, hangs
past its timeout or is cut off is logged and the server goes on serving; a connection that fails the
handshake is logged and closed. The process exits non-zero only when it cannot serve at all (cannot bind,
no tracker at start).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import importlib.util
import json
import logging
import multiprocessing
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.errors import EdgecError, InfraError, UsageError
from toolchain.core.versions import environment
from toolchain.device.protocol import (
    HANDSHAKE_TIMEOUT_S,
    KIND_FUNCS,
    LOG_ENV,
    MAGIC,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    HandshakeError,
    new_nonce,
    proof,
    proof_ok,
    recv_exact,
    recv_frame,
    send_frame,
    set_keepalive,
    version_mismatch,
    versions,
)
from toolchain.device.runners import OrtModelRunner, TrtOnnxRunner, TvmLibRunner
from toolchain.device.tensorrt_engine import gpu_visible
from toolchain.measure.timing import (
    MeasureConfig,
    MemoryProbe,
    measure_rounds,  # timing without statistics (no scipy on a device)
    run_batched,
)

log = logging.getLogger("edgec.device")

# (payload path, input names, threads, **the artifact's runner options) -> a runner: a context manager with
# ``infer(feed) -> [arrays]``.
RunnerFactory = Callable[..., Any]

RPC_TRACKER_MAGIC = 0x2F271  # TVM's tracker protocol (tvm.rpc.base), spoken here without importing tvm.rpc
TRACKER_SUCCESS, TRACKER_PUT, TRACKER_UPDATE_INFO, TRACKER_GET_PENDING = 0, 3, 5, 7
PING_PERIOD_S = 2.0  # as TVM's server: re-offer a match key a client took but did not use
TRACKER_WAIT_S = 30.0  # at start: no tracker within this, and the device cannot serve


def available_runners() -> dict[str, RunnerFactory]:
    """The artifact kinds this device can run: TVM libraries always, ONNX models where onnxruntime is
    installed, ONNX models built into TensorRT engines here where tensorrt is installed and an NVIDIA GPU is
    visible (looked up, not imported: a broken SDK fails its own sessions, not the server)."""
    runners: dict[str, RunnerFactory] = {"tvm-lib": TvmLibRunner}
    if importlib.util.find_spec("onnxruntime") is not None:
        runners["ort-model"] = OrtModelRunner
    if importlib.util.find_spec("tensorrt") is not None and gpu_visible():
        runners["trt-onnx"] = TrtOnnxRunner
    return runners


def bench(make: RunnerFactory, path: Path, cfg_json: str, x_bytes: bytes, emulated: bool = False) -> str:
    """Time an uploaded artifact here and return the raw measurement, for the client to summarize (statistics
    need scipy, which a device does not have). JSON: per round the samples in ms (base64 float32) and the
    warm-up, the outputs of every evaluation input (base64 float32; not with ``"measure_only"``), memory,
    environment; or {"error": ...} when the artifact fails here."""
    try:
        cfg = json.loads(cfg_json)
        shape = tuple(cfg["shape"])
        x = np.frombuffer(bytes(x_bytes), dtype=np.float32).reshape(-1, *shape[1:])
        names, threads = list(cfg["input_names"]), int(cfg["threads"])
        options = dict(cfg.get("runner_options") or {})  # e.g. a TensorRT build's workspace; validated by the runner

        def runner() -> Any:
            return make(path, names, threads, **options)

        memory = MemoryProbe()
        feed = {cfg["input_name"]: x[:1].reshape(shape)}
        rounds = measure_rounds({"candidate": (runner, feed)}, MeasureConfig(**cfg["measure"]), memory)["candidate"]
        res: dict[str, Any] = {"rounds_ms_b64": [_b64(np.asarray(p, np.float32)) for p in rounds.parts],
                               "warmups": rounds.warms}
        if not cfg.get("measure_only"):
            with runner() as r:
                out = np.ascontiguousarray(run_batched(r, cfg["input_name"], x, shape), dtype=np.float32)
                memory.sample()
            res["outputs_b64"] = _b64(out)
            res["outputs_shape"] = list(out.shape)
        res["memory"] = memory.to_json()
        res["environment"] = environment()
        if emulated:
            res["emulated"] = True
        return json.dumps(res)
    except Exception as e:  # noqa: BLE001  (the artifact failed here: report it; the session stays usable)
        return json.dumps({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _log_call(name: str, file_name: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps({"call": name, "file": Path(file_name).name, "pid": os.getpid(), "time": time.time()})
    with open(path, "a", encoding="utf-8") as f:  # one short O_APPEND write: sessions do not interleave
        f.write(line + "\n")


def _register_session_functions(workdir: Path, runners: dict[str, RunnerFactory], emulated: bool) -> None:
    """TVM's file functions confined to the session directory, and edgec's bench function per kind."""
    import tvm
    import tvm_ffi

    def workpath(name: str) -> str:
        return str(workdir / name)

    upload = tvm_ffi.get_global_func("tvm.rpc.server.upload")

    def logged_upload(name: str, blob: Any) -> None:
        _log_call("upload", name)
        upload(name, blob)

    def load_module(name: str) -> Any:
        _log_call("load_module", name)
        return tvm.runtime.load_module(workpath(name))

    tvm_ffi.register_global_func("tvm.rpc.server.workpath", workpath, override=True)
    tvm_ffi.register_global_func("tvm.rpc.server.upload", logged_upload, override=True)
    tvm_ffi.register_global_func("tvm.rpc.server.load_module", load_module, override=True)

    def bench_fn(make: RunnerFactory) -> Callable[[str, str, Any], str]:
        return lambda name, cfg, x: bench(make, workdir / Path(name).name, cfg, x, emulated)

    for kind, make in runners.items():
        tvm_ffi.register_global_func(KIND_FUNCS[kind], bench_fn(make), override=True)


def _die_with_parent() -> None:
    """Linux: this session process gets SIGKILL when the device server dies, so its socket closes too."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _session_main(conn: socket.socket, workdir: Path, runners: dict[str, RunnerFactory], emulated: bool,
                  close_fds: list[socket.socket]) -> None:
    """A forked session process: TVM's server loop on the authenticated socket."""
    _die_with_parent()
    for s in close_fds:
        s.close()
    import tvm_ffi

    os.chdir(workdir)
    _register_session_functions(workdir, runners, emulated)
    try:
        tvm_ffi.get_global_func("rpc.ServerLoop")(conn.fileno())
    except Exception as e:  # noqa: BLE001  (the client went away mid-packet, or sent garbage: one line, exit 1)
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        log.warning("session process %d: %s", os.getpid(), (lines[-1] if lines else type(e).__name__)[:200])
        sys.exit(1)


class DeviceServer:
    """A device behind a tracker (or alone on a port): accept, authenticate, serve one session at a time."""

    def __init__(self, token: str, key: str, tracker: tuple[str, int] | None = None, host: str = "127.0.0.1",
                 port: int = 9090, port_end: int = 9199, runners: dict[str, RunnerFactory] | None = None,
                 session_timeout_s: float = 0.0, emulated: bool = False, custom_addr: str | None = None) -> None:
        if not token:
            raise UsageError(f"a device server needs a shared token; pass --token or set {TOKEN_ENV}")
        import tvm
        import tvm_ffi

        if tvm_ffi.get_global_func("rpc.ServerLoop", allow_missing=True) is None:
            raise InfraError("this TVM build has no RPC support (rpc.ServerLoop); install apache-tvm from the registry")
        self.token, self.key, self.tracker = token, key, tracker
        self.runners = dict(available_runners() if runners is None else runners)
        self.session_timeout_s = session_timeout_s
        self.emulated = emulated
        self.custom_addr = custom_addr
        self.versions = versions(tvm.__version__, tvm_ffi.__version__)
        self.sessions = 0
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.port = 0
        for p in range(port, max(port_end, port + 1)):
            try:
                self.sock.bind((host, p))
                self.port = int(self.sock.getsockname()[1])  # port 0: the one the system picked
                break
            except OSError:
                continue
        if not self.port:
            self.sock.close()
            raise InfraError(f"cannot bind to any port in [{port}, {port_end}) on {host}; pick a free --port")
        self.host = host
        self.sock.listen(8)
        self._tracker_sock: socket.socket | None = None
        self._matchkey = key
        if tracker is not None:
            self._connect_tracker(TRACKER_WAIT_S)

    # -- tracker (TVM's protocol: tvm.rpc.base / tvm.rpc.server) --------------------------------------------

    def _tracker_send(self, msg: list[Any]) -> Any:
        assert self._tracker_sock is not None
        data = json.dumps(msg).encode()
        self._tracker_sock.sendall(struct.pack("<i", len(data)) + data)
        (size,) = struct.unpack("<i", recv_exact(self._tracker_sock, 4))
        return json.loads(recv_exact(self._tracker_sock, size))

    def _connect_tracker(self, wait_s: float | None) -> None:
        """Connect and register; retry until ``wait_s`` (None: for ever) then raise InfraError."""
        assert self.tracker is not None
        t_end = None if wait_s is None else time.monotonic() + wait_s
        delay = 0.2
        while True:
            try:
                s = socket.create_connection(self.tracker, timeout=10.0)
                s.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
                if struct.unpack("<i", recv_exact(s, 4))[0] != RPC_TRACKER_MAGIC:
                    s.close()
                    raise InfraError(f"{self.tracker[0]}:{self.tracker[1]} is not a TVM RPC tracker; fix --tracker")
                self._tracker_sock = s
                info = {"key": "server:" + self.key, "addr": [self.custom_addr, self.port]}
                if self._tracker_send([TRACKER_UPDATE_INFO, info]) != TRACKER_SUCCESS:
                    raise OSError("tracker refused the device info")
                self._put_new_matchkey()
                return
            except (OSError, HandshakeError, ValueError) as e:
                self._drop_tracker()
                if t_end is not None and time.monotonic() > t_end:
                    raise InfraError(f"cannot reach the RPC tracker at {self.tracker[0]}:{self.tracker[1]} ({e}); "
                                     "start it with 'python -m tvm.exec.rpc_tracker' or fix --tracker") from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _put_new_matchkey(self) -> None:
        self._matchkey = f"{self.key}:{new_nonce()[:16]}"
        msg = [TRACKER_PUT, self.key, [self.port, self._matchkey], self.custom_addr]
        if self._tracker_send(msg) != TRACKER_SUCCESS:
            raise OSError("tracker refused the device")

    def _drop_tracker(self) -> None:
        if self._tracker_sock is not None:
            self._tracker_sock.close()
            self._tracker_sock = None

    # -- serving ----------------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        while True:
            try:
                if self.tracker is not None and self._tracker_sock is None:
                    self._connect_tracker(None)
                conn, addr, hello = self._next_client()
            except (OSError, HandshakeError, ValueError) as e:
                log.warning("tracker connection lost (%s); reconnecting", e)
                self._drop_tracker()
                continue
            except EdgecError:
                raise  # no tracker at all
            except Exception as e:  # noqa: BLE001
                log.error("serving loop: %s: %s", type(e).__name__, e)
                time.sleep(1.0)
                continue
            self._run_session(conn, addr, hello)
            if self.tracker is not None and self._tracker_sock is not None:
                try:
                    self._put_new_matchkey()  # back in the tracker's pool
                except (OSError, HandshakeError, ValueError):
                    self._drop_tracker()

    def _next_client(self) -> tuple[socket.socket, str, dict[str, Any]]:
        """Wait for a connection that completes the handshake; ping the tracker meanwhile."""
        unused_periods = 0
        while True:
            ready, _, _ = select.select([self.sock], [], [], PING_PERIOD_S)
            if not ready:
                if self._tracker_sock is not None:  # as TVM: a key taken but not used for a while is renewed
                    pending = self._tracker_send([TRACKER_GET_PENDING])
                    unused_periods = unused_periods + 1 if self._matchkey not in pending else 0
                    if unused_periods * PING_PERIOD_S > 4 + PING_PERIOD_S:
                        self._put_new_matchkey()
                        unused_periods = 0
                continue
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            addr = f"{peer[0]}:{peer[1]}"
            try:
                hello = self._handshake(conn)
            except HandshakeError as e:
                log.warning("refused %s: %s", addr, e)
                conn.close()
                continue
            except Exception as e:  # noqa: BLE001
                log.error("handshake with %s failed: %s: %s", addr, type(e).__name__, e)
                conn.close()
                continue
            return conn, addr, hello

    def _handshake(self, conn: socket.socket) -> dict[str, Any]:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        set_keepalive(conn)
        if recv_exact(conn, len(MAGIC), deadline) != MAGIC:
            raise HandshakeError("not an edgec client (wrong magic: a raw TVM RPC client, or garbage)")
        hello = recv_frame(conn, deadline)
        if hello.get("edgec") != "client" or not isinstance(hello.get("nonce"), str) or len(hello["nonce"]) < 32 \
                or not isinstance(hello.get("versions"), dict) or not isinstance(hello.get("key"), str):
            raise HandshakeError("malformed client hello")

        def refuse(msg: str) -> HandshakeError:
            with contextlib.suppress(OSError):
                send_frame(conn, {"error": msg})
            return HandshakeError(msg)

        mismatch = version_mismatch(hello["versions"], self.versions)
        if mismatch:
            raise refuse(mismatch.replace(" here,", " on the client,"))
        dev = {"edgec": "device", "protocol": PROTOCOL_VERSION, "nonce": new_nonce(), "versions": self.versions,
               "emulated": self.emulated}
        dev["proof"] = proof(self.token, "device", hello, dev)
        send_frame(conn, dev)
        reply = recv_frame(conn, deadline)
        if not proof_ok(self.token, "client", hello, dev, reply.get("proof")):
            raise refuse("wrong token")
        if hello["key"] != self._matchkey:
            raise refuse("stale match key: request the device from the tracker again")
        send_frame(conn, {"ok": True})
        conn.settimeout(None)
        return hello

    def _run_session(self, conn: socket.socket, addr: str, hello: dict[str, Any]) -> None:
        self.sessions += 1
        try:
            asked = max(0.0, float(hello.get("session_timeout_s") or 0))
        except (TypeError, ValueError):
            asked = 0.0
        timeout = min(t for t in (asked, self.session_timeout_s) if t > 0) if asked or self.session_timeout_s else None
        workdir = Path(tempfile.mkdtemp(prefix="edgec-session-"))
        others = [s for s in (self.sock, self._tracker_sock) if s is not None]
        proc = multiprocessing.get_context("fork").Process(
            target=_session_main, args=(conn, workdir, self.runners, self.emulated, others), daemon=True)
        try:
            proc.start()
            proc.join(timeout)
            if proc.is_alive():
                log.warning("session %d from %s passed its %.0f s timeout; ended", self.sessions, addr, timeout or 0)
                proc.kill()
                proc.join()
            elif proc.exitcode:
                how = f"signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit code {proc.exitcode}"
                log.warning("session %d from %s ended with %s; still serving", self.sessions, addr, how)
            else:
                log.info("session %d from %s done", self.sessions, addr)
        except Exception as e:  # noqa: BLE001
            log.error("session %d from %s failed: %s: %s", self.sessions, addr, type(e).__name__, e)
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            shutil.rmtree(workdir, ignore_errors=True)

    def close(self) -> None:
        self._drop_tracker()
        self.sock.close()


def parse_tracker(tracker: str | None) -> tuple[str, int] | None:
    if not tracker:
        return None
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--tracker {tracker!r} must be HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def main(argv: list[str] | None = None, runners: dict[str, RunnerFactory] | None = None) -> int:
    """``python -m toolchain.device.runtime``: serve until killed. Exit 2/3 with one line when it cannot."""
    ap = argparse.ArgumentParser(prog="python -m toolchain.device.runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--key", required=True, help="device key clients request, e.g. the profile id")
    ap.add_argument("--tracker", help="HOST:PORT of the TVM RPC tracker")
    ap.add_argument("--token", help=f"shared token (default: ${TOKEN_ENV})")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--port-end", type=int, default=9199)
    ap.add_argument("--session-timeout", type=float, default=0.0, help="end any session after this many seconds")
    ap.add_argument("--custom-addr", help="address the tracker gives clients (e.g. 127.0.0.1 behind an SSH tunnel)")
    ap.add_argument("--emulated", action="store_true", help="mark every result as measured on an emulator")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s edgec device: %(message)s", stream=sys.stderr)
    try:
        server = DeviceServer(args.token or os.environ.get(TOKEN_ENV, ""), args.key, parse_tracker(args.tracker),
                              args.host, args.port, args.port_end, runners, args.session_timeout, args.emulated,
                              args.custom_addr)
    except EdgecError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"edgec device: serving key {args.key!r} on {args.host}:{server.port}"
          + (f" via tracker {args.tracker}" if args.tracker else "")
          + f" (runs {', '.join(sorted(server.runners))})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return 0
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
