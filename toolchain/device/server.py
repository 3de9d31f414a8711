"""The device side of remote benchmarking: a TVM RPC server with edgec's functions and a token check.

TVM RPC has no authentication: any client that reaches the port can call any global function of the
server process. This server adds a challenge-response check and guards what matters:

* every session (one forked process per client connection, TVM's design) gets a fresh random nonce;
  the client must call ``edgec.auth(HMAC-SHA256(token, nonce))`` first;
* until then, edgec's functions and TVM's file/module functions (upload, download, remove, listdir,
  load_module, download_linked_module, workpath) refuse to run, and a wrong MAC ends the session.

What this does NOT protect: other TVM global functions registered in the server process remain
callable by anyone who can connect, and traffic is not encrypted. So the server binds to loopback by
default; to reach a device over a network, use an SSH tunnel or a private network, and treat the
token as an access check against the wrong client, not as a security boundary.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from targets import load_runner
from toolchain.core.errors import UsageError
from toolchain.core.versions import environment
from toolchain.device.protocol import KIND_FUNCS, LOG_ENV, TOKEN_ENV, mac
from toolchain.measure.timing import MeasureConfig, MemoryProbe, bench_loaded

GUARDED = ("tvm.rpc.server.upload", "tvm.rpc.server.download", "tvm.rpc.server.remove",
           "tvm.rpc.server.listdir", "tvm.rpc.server.load_module", "tvm.rpc.server.download_linked_module",
           "tvm.rpc.server.workpath")

# Per-session state: each RPC session runs in its own forked process, so module globals are per session.
_STATE: dict[str, Any] = {"token": None, "nonce": None, "authed": False, "workdir": None}


def _require_auth() -> None:
    if not _STATE["authed"]:
        raise PermissionError("edgec device: session not authenticated; call edgec.auth with the token's HMAC first")


def _challenge() -> str:
    _STATE["nonce"] = secrets.token_hex(16)
    return str(_STATE["nonce"])


def _auth(client_mac: str) -> str:
    nonce, token = _STATE["nonce"], _STATE["token"]
    _STATE["nonce"] = None  # one try per challenge
    if not nonce or not token or not hmac.compare_digest(mac(token, nonce), str(client_mac)):
        _STATE["authed"] = False
        # A wrong token ends the session: the process exits after this reply would be lost, so raise.
        raise PermissionError("edgec device: wrong token; refused")
    _STATE["authed"] = True
    return "ok"


def _log(name: str, args: tuple[Any, ...]) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    first = args[0] if args and isinstance(args[0], str) else None
    line = json.dumps({"call": name.rsplit(".", 1)[-1], "file": Path(first).name if first else None,
                       "pid": os.getpid(), "time": time.time()})
    with open(path, "a", encoding="utf-8") as f:  # one short O_APPEND write: sessions do not interleave
        f.write(line + "\n")


def _guard(fn: Any, name: str = "") -> Any:
    def guarded(*args: Any) -> Any:
        _require_auth()
        _log(name, args)
        return fn(*args)

    return guarded


def device_bench(kind: str, file_name: str, cfg_json: str, x_bytes: bytes) -> str:
    """Benchmark an uploaded artifact on this device. Returns JSON: latency, thinned samples, the
    outputs of every evaluation input (base64 float32), memory, environment; or {"error": ...}."""
    _require_auth()
    try:
        cfg = json.loads(cfg_json)
        shape = tuple(cfg["shape"])
        x = np.frombuffer(bytes(x_bytes), dtype=np.float32).reshape(-1, *shape[1:])
        path = Path(_STATE["workdir"] or ".") / Path(file_name).name  # never outside the session dir
        mem = MemoryProbe()
        res = bench_loaded(lambda: load_runner(kind, path, cfg["input_names"], int(cfg["threads"])),
                           cfg["input_name"], shape, x,
                           MeasureConfig(**cfg["measure"]), mem)
        out = np.ascontiguousarray(res.pop("outputs"), dtype=np.float32)
        res["outputs_b64"] = base64.b64encode(out.tobytes()).decode()
        res["outputs_shape"] = list(out.shape)
        res["environment"] = environment()
        return json.dumps(res)
    except Exception as e:  # the artifact failed on the device: report it, the session stays usable
        return json.dumps({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})


def _register_session_functions(workdir: str | None) -> None:
    import tvm_ffi

    _STATE.update(authed=False, nonce=None, workdir=workdir)
    for name in GUARDED:
        orig = tvm_ffi.get_global_func(name, allow_missing=True)
        if orig is not None:
            tvm_ffi.register_global_func(name, _guard(orig, name), override=True)
    tvm_ffi.register_global_func("edgec.challenge", _challenge, override=True)
    tvm_ffi.register_global_func("edgec.auth", _auth, override=True)

    def make(kind: str) -> Any:
        return lambda f, c, x: device_bench(kind, f, c, x)

    for kind, fname in KIND_FUNCS.items():
        if kind == "trt-engine":
            try:
                import tensorrt  # noqa: F401  (registered only where TensorRT imports)
            except Exception:
                continue
        tvm_ffi.register_global_func(fname, make(kind), override=True)


def _edgec_serve_loop(sock: Any, load_library: Any, work_path: Any) -> None:
    """Replacement for tvm.rpc.server._serve_loop: TVM's session env, then edgec's guarded functions."""
    from tvm.rpc import _ffi_api
    from tvm.rpc import server as tvm_server

    temp = tvm_server._server_env(load_library, work_path)
    _register_session_functions(getattr(temp, "path", None) or getattr(temp, "temp_dir", None))
    _ffi_api.ServerLoop(sock.fileno())


def serve(tracker: tuple[str, int] | None, key: str, token: str, host: str = "127.0.0.1", port: int = 9090,
          port_end: int = 9199, silent: bool = False) -> Any:
    """Start the device server in this process (a listener thread); returns TVM's server state (``.port``)."""
    if not token:
        raise UsageError(f"a device server needs a shared token; pass --token or set {TOKEN_ENV}")
    from tvm.rpc import server as tvm_server

    _STATE["token"] = token
    # Sessions are forked from this process by TVM's listen loop and look the loop function up by name.
    tvm_server._serve_loop = _edgec_serve_loop
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    return tvm_server.PopenRPCServerState(host, port, port_end, False, tracker, key, None, None, silent)
