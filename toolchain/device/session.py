"""Client side of a device session: ask the tracker for a device, run edgec's handshake on the device socket
(the device proves the token first, then this client), and only then speak TVM's RPC protocol over that
same socket.

TVM's client (``rpc.Connect``, C++) opens its own socket and cannot take one, so the authenticated device
socket is handed to it through a one-shot relay process on loopback: the relay accepts exactly one connection
that presents a random one-time key, answers TVM's connect exchange itself, then copies bytes both ways. When
the device closes (it died, or a partition hit the keepalive), the relay closes TVM's side at once and the
pending call fails: a dropped device is seen in about a second, not after the tracker's request timeout.
"""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from toolchain.core.errors import InfraError, UsageError
from toolchain.device.protocol import (
    HANDSHAKE_TIMEOUT_S,
    MAGIC,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    DeviceLost,
    HandshakeError,
    RemoteSpec,
    new_nonce,
    proof,
    proof_ok,
    recv_frame,
    send_frame,
    set_keepalive,
    version_mismatch,
    versions,
)


def _tracker_call(spec: RemoteSpec, msg: list[Any], timeout: float) -> Any:
    from tvm.rpc import base

    try:
        sock = socket.create_connection((spec.tracker_host, spec.tracker_port), timeout=min(timeout, 10.0))
    except OSError as e:
        raise InfraError(f"cannot reach the RPC tracker at {spec.tracker_host}:{spec.tracker_port} ({e}); "
                         "start it with 'python -m tvm.exec.rpc_tracker' or fix --tracker") from None
    where = f"{spec.tracker_host}:{spec.tracker_port}"
    try:
        sock.settimeout(min(timeout, 10.0))
        try:  # a device's port (or any other server) answers otherwise, closes, or waits for its own handshake
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        except (OSError, RuntimeError, struct.error) as e:
            raise InfraError(f"{where} did not answer as a TVM RPC tracker ({type(e).__name__}); fix --tracker "
                             "(a device's port is not the tracker's)") from None
        if magic != base.RPC_TRACKER_MAGIC:
            raise InfraError(f"{where} is not a TVM RPC tracker; fix --tracker")
        sock.settimeout(timeout)
        base.sendjson(sock, msg)
        return base.recvjson(sock)
    except TimeoutError:
        raise InfraError(f"no device with key {spec.key!r} became free within {timeout:.0f} s; "
                         "start one with 'edgec device serve' or raise the timeout") from None
    except (OSError, RuntimeError, ValueError) as e:
        raise InfraError(f"the RPC tracker at {where} broke off the request ({type(e).__name__}); "
                         "check that it runs and rerun") from None
    finally:
        sock.close()


def devices(spec: RemoteSpec) -> list[str]:
    """Addresses of the servers registered under ``spec.key``."""
    from tvm.rpc import base

    info = _tracker_call(spec, [base.TrackerCode.SUMMARY], 10.0)
    servers = info[1]["server_info"] if isinstance(info, list) else info.get("server_info", [])
    return [f"{s['addr'][0]}:{s['addr'][1]}" for s in servers if s.get("key") == "server:" + spec.key]


def local_versions() -> dict[str, Any]:
    import tvm
    import tvm_ffi

    return versions(tvm.__version__, tvm_ffi.__version__)


def open_session(spec: RemoteSpec) -> tuple[Any, str]:
    """(authenticated RPC session, device address). Raises InfraError when no device comes, DeviceLost when
    the connection breaks, UsageError when the device does not prove the token or refuses this client's."""
    from tvm.rpc import base

    value = _tracker_call(spec, [base.TrackerCode.REQUEST, spec.key, "", 1], spec.request_timeout_s)
    if value[0] != base.TrackerCode.SUCCESS:
        raise InfraError(f"tracker refused the request for key {spec.key!r}: {value}")
    host, port, matchkey = value[1]
    return connect_device(str(host), int(port), str(matchkey), spec.token, spec.session_timeout_s), f"{host}:{port}"


def handshake(sock: socket.socket, token: str, key: str, session_timeout_s: float = 0.0,
              addr: str = "device") -> dict[str, Any]:
    """Run the client's half of the edgec handshake on a connected socket; returns the device's hello."""
    mine = local_versions()
    hello = {"edgec": "client", "protocol": PROTOCOL_VERSION, "nonce": new_nonce(), "versions": mine,
             "key": key, "session_timeout_s": float(session_timeout_s)}
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    try:
        sock.sendall(MAGIC)
        send_frame(sock, hello)
        dev = recv_frame(sock, deadline)
    except (HandshakeError, OSError) as e:
        raise DeviceLost(f"{addr} closed the connection during the edgec handshake ({e}): it stopped, or it is "
                         "not an edgec device (start one with 'edgec device serve')") from None
    if "error" in dev:
        raise UsageError(f"device {addr} refused the session: {str(dev['error'])[:300]}")
    if dev.get("edgec") != "device" or not isinstance(dev.get("nonce"), str) or dev["nonce"] == hello["nonce"]:
        raise UsageError(f"{addr} does not speak edgec's device protocol; start it with 'edgec device serve'")
    if not proof_ok(token, "device", hello, dev, dev.get("proof")):
        raise UsageError(f"device {addr} did not prove the token, so this client refused it and sends it nothing: "
                         f"pass the token the device was started with (--token or {TOKEN_ENV}); if that is the "
                         "one, the device at that address is not yours")
    mismatch = version_mismatch(mine, dev.get("versions") or {})
    if mismatch:
        raise UsageError(f"device {addr}: {mismatch}")
    try:
        send_frame(sock, {"proof": proof(token, "client", hello, dev)})
        final = recv_frame(sock, deadline)
    except (HandshakeError, OSError) as e:
        raise DeviceLost(f"{addr} closed the connection during the edgec handshake ({e})") from None
    if not final.get("ok"):
        raise UsageError(f"device {addr} refused this client: {str(final.get('error'))[:200]}")
    return dev


def connect_device(host: str, port: int, key: str, token: str, session_timeout_s: float = 0.0) -> Any:
    """An authenticated TVM RPC session with the device at host:port (``key``: the tracker's match key)."""
    from tvm.rpc import _ffi_api
    from tvm.rpc.client import RPCSession

    addr = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S)
    except OSError as e:
        raise DeviceLost(f"{addr}: cannot connect ({e})") from None
    try:
        set_keepalive(sock)
        dev = handshake(sock, token, key, session_timeout_s, addr)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    relay = _Relay(sock)
    try:
        sess = RPCSession(_ffi_api.Connect("127.0.0.1", relay.port, relay.ticket, False))
    except Exception as e:  # noqa: BLE001
        relay.close()
        raise DeviceLost(f"{addr}: the RPC session did not start ({str(e).strip().splitlines()[-1][:200]})") from None
    sess.edgec_device = dev  # the device's authenticated hello: versions, whether it is emulated
    return sess


# The relay runs in its own small process: TVM's client holds the GIL in some calls that wait on the device
# (freeing a remote object does), so a relay thread in this process could never forward that wait's bytes.
# Standard library only; started with ``python -I -S``. argv: listener fd, device fd, one-time key, RPC magic.
_RELAY_SRC = r"""
import socket, struct, sys, threading
lfd, dfd, ticket, magic = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
listener, device = socket.socket(fileno=lfd), socket.socket(fileno=dfd)
listener.settimeout(10.0)

def recvall(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("closed")
        buf += chunk
    return buf

local = None
try:
    while local is None:
        c, _ = listener.accept()
        c.settimeout(10.0)
        try:
            m, size = struct.unpack("<ii", recvall(c, 8))
            words = recvall(c, size).decode().split() if 0 < size < 1024 else []
        except (OSError, UnicodeDecodeError, struct.error):
            c.close()
            continue
        if m != magic or not words or words[0] != "client:" + ticket:
            c.close()
            continue
        key = b"server:edgec-device"
        c.sendall(struct.pack("<ii", magic, len(key)) + key)
        c.settimeout(None)
        local = c
except OSError:
    sys.exit(1)
listener.close()
done = threading.Event()

def pump(src, dst):
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    done.set()

threading.Thread(target=pump, args=(device, local), daemon=True).start()
threading.Thread(target=pump, args=(local, device), daemon=True).start()
done.wait()
for s in (device, local):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
"""


class _Relay:
    """Loopback endpoint for TVM's C++ client, joined to the authenticated device socket by a relay process."""

    def __init__(self, device: socket.socket) -> None:
        from tvm.rpc import base

        self.ticket = secrets.token_hex(16)
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(listener.getsockname()[1])
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _RELAY_SRC, str(listener.fileno()), str(device.fileno()),
                 self.ticket, str(base.RPC_MAGIC)], pass_fds=(listener.fileno(), device.fileno()),
                stdin=subprocess.DEVNULL)
        finally:
            listener.close()  # the relay has its own copies
            device.close()
        threading.Thread(target=self.proc.wait, daemon=True, name="edgec-relay-reaper").start()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
