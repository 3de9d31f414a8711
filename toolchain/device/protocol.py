"""What client and device agree on: the token, the handshake that runs on the device socket before TVM sees a
byte, the device functions per artifact kind, where the devices are (``RemoteSpec``). Standard library only:
the lean device runtime imports it.

The handshake (every frame: 4-byte big-endian length, then JSON; at most ``MAX_FRAME`` bytes):

1. client -> device: ``MAGIC``, then ``{"edgec": "client", "protocol", "nonce", "versions", "key", ...}``
2. device -> client: ``{"edgec": "device", "protocol", "nonce", "versions", "proof"}`` where ``proof`` is
   HMAC-SHA256(token, "device" + both hellos): the device proves the token first, so a client never sends
   its own proof (nor an artifact) to a device that does not know the token;
3. client -> device: ``{"proof"}``, HMAC-SHA256(token, "client" + both hellos);
4. device -> client: ``{"ok": true}``, and from then on the socket carries TVM's RPC protocol; or
   ``{"error": ...}`` and the device closes the socket.

Versions (edgec, TVM, tvm-ffi, the protocol) are in both hellos, so both proofs cover them; either side
refuses a mismatch. The token authenticates the peers; it does not encrypt or sign the stream that follows.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata as md
import json
import os
import re
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.core.errors import UsageError

TOKEN_ENV = "EDGEC_DEVICE_TOKEN"
# When set, the device appends one JSON line here per upload / module load: what it actually received and
# ran (tuning candidates, benchmarks), readable by its operator.
LOG_ENV = "EDGEC_DEVICE_LOG"
# Artifact kind -> the device function that benchmarks it. "trt-onnx": an ONNX the device builds a TensorRT
# engine from (and caches) itself; "trt-engine": an engine built elsewhere (``edgec device serve`` only).
KIND_FUNCS = {"tvm-lib": "edgec.tvm_bench", "ort-model": "edgec.ort_bench", "trt-engine": "edgec.trt_bench",
              "trt-onnx": "edgec.trt_onnx_bench"}

MAGIC = b"EDGC"  # TVM's RPC magic is 0x000FF271: a plain TVM client or server fails on the first 4 bytes
PROTOCOL_VERSION = 1
MAX_FRAME = 8192
HANDSHAKE_TIMEOUT_S = 10.0  # the whole handshake, on each side
# TCP keepalive: a silent peer (network partition, powered-off device) is probed after KEEPIDLE_S idle
# seconds, every KEEPINTVL_S, and dropped after KEEPCNT unanswered probes; unacknowledged data is given up
# after USER_TIMEOUT_MS. A peer whose process dies is seen at once (its kernel closes the socket).
KEEPIDLE_S, KEEPINTVL_S, KEEPCNT, USER_TIMEOUT_MS = 5, 2, 3, 15_000
VERSION_KEYS = ("protocol", "edgec", "tvm", "tvm_ffi")  # must be equal on both sides


class HandshakeError(Exception):
    """The peer did not complete the edgec handshake (garbage, a wrong proof, a closed socket, a timeout)."""


class DeviceLost(Exception):
    """The connection to a device broke (it stopped, crashed or the network dropped)."""


def token_from_env(token: str | None = None) -> str | None:
    """The device token: the one given, else ``$EDGEC_DEVICE_TOKEN``."""
    return token or os.environ.get(TOKEN_ENV)


def edgec_version() -> str:
    """This checkout's version (pyproject.toml beside the package), else the installed distribution's."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        return md.version("edgec")
    except md.PackageNotFoundError:
        return "unknown"


def versions(tvm_version: str, tvm_ffi_version: str) -> dict[str, Any]:
    """What a side announces in its hello."""
    return {"protocol": PROTOCOL_VERSION, "edgec": edgec_version(), "tvm": tvm_version, "tvm_ffi": tvm_ffi_version}


def version_mismatch(host: dict[str, Any], device: dict[str, Any]) -> str | None:
    """A one-line message when host and device cannot work together, else None."""
    diff = [f"{k} {host.get(k)} here, {device.get(k)} on the device" for k in VERSION_KEYS
            if str(host.get(k)) != str(device.get(k))]
    if not diff:
        return None
    return ("host and device versions differ (" + "; ".join(diff) + "): install the same edgec checkout and "
            "apache-tvm / apache-tvm-ffi versions on both")


def new_nonce() -> str:
    return secrets.token_hex(16)


def proof(token: str, role: str, client_hello: dict[str, Any], device_hello: dict[str, Any]) -> str:
    """HMAC-SHA256 over the role and both hellos (the device's without its proof): fresh nonces from both
    sides, and the versions and key each announced."""
    dev = {k: v for k, v in device_hello.items() if k != "proof"}
    msg = json.dumps({"role": role, "client": client_hello, "device": dev}, sort_keys=True, separators=(",", ":"))
    return hmac.new(token.encode(), msg.encode(), hashlib.sha256).hexdigest()


def proof_ok(token: str, role: str, client_hello: dict[str, Any], device_hello: dict[str, Any],
             claimed: Any) -> bool:
    return isinstance(claimed, str) and hmac.compare_digest(proof(token, role, client_hello, device_hello), claimed)


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    if len(data) > MAX_FRAME:
        raise HandshakeError(f"handshake frame of {len(data)} bytes exceeds {MAX_FRAME}")
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes; with ``deadline`` (``time.monotonic()``), a peer that trickles bytes cannot hold on longer."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandshakeError(f"timed out after {HANDSHAKE_TIMEOUT_S:.0f} s")
            sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise HandshakeError(f"timed out after {HANDSHAKE_TIMEOUT_S:.0f} s") from None
        except OSError as e:
            raise HandshakeError(f"connection error ({e})") from None
        if not chunk:
            raise HandshakeError("connection closed")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, deadline: float | None = None) -> dict[str, Any]:
    (size,) = struct.unpack(">I", recv_exact(sock, 4, deadline))
    if not 0 < size <= MAX_FRAME:
        raise HandshakeError(f"bad frame length {size}")
    try:
        obj = json.loads(recv_exact(sock, size, deadline))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HandshakeError("frame is not JSON") from None
    if not isinstance(obj, dict):
        raise HandshakeError("frame is not a JSON object")
    return obj


def set_keepalive(sock: socket.socket) -> None:
    """Detect a silent peer within about ``USER_TIMEOUT_MS`` (see the constants above)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPIDLE_S), ("TCP_KEEPINTVL", KEEPINTVL_S), ("TCP_KEEPCNT", KEEPCNT),
                        ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        opt = getattr(socket, name, None)
        if opt is not None:  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


@dataclass(frozen=True)
class RemoteSpec:
    """Where the devices are and how long to wait for them."""

    tracker_host: str
    tracker_port: int
    key: str
    token: str
    request_timeout_s: float = 120.0  # waiting for a free device (all busy)
    session_timeout_s: float = 0.0  # 0: the device never kills a session on its own
    max_attempts: int = 3  # per artifact, across devices

    @staticmethod
    def parse(tracker: str, key: str, token: str | None, **kw: Any) -> RemoteSpec:
        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--tracker {tracker!r} must be HOST:PORT, e.g. 127.0.0.1:9190")
        if not token:
            raise UsageError(f"remote bench needs the device token; pass --token or set {TOKEN_ENV}")
        return RemoteSpec(host, int(port), key, token, **kw)
