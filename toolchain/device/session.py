"""Client side of a device session: ask the tracker for a device, connect, prove the token."""

from __future__ import annotations

import socket
import struct
from typing import Any

from toolchain.core.errors import InfraError, UsageError
from toolchain.device.protocol import DeviceLost, RemoteSpec, mac


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


