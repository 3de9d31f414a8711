"""What client and device agree on: the token, the device functions per artifact kind, the MAC, where the
devices are (``RemoteSpec``). Standard library only: the device side imports it too."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

from toolchain.core.errors import UsageError

TOKEN_ENV = "EDGEC_DEVICE_TOKEN"
# When set, every authenticated file/module call (upload, load_module, ...) appends one JSON line here:
# what a device actually received and ran (tuning candidates, benchmarks), readable by its operator.
LOG_ENV = "EDGEC_DEVICE_LOG"
# Artifact kind -> the device function that benchmarks it.
KIND_FUNCS = {"tvm-lib": "edgec.tvm_bench", "ort-model": "edgec.ort_bench", "trt-engine": "edgec.trt_bench"}


def mac(token: str, nonce: str) -> str:
    return hmac.new(token.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def token_from_env(token: str | None = None) -> str | None:
    """The device token: the one given, else ``$EDGEC_DEVICE_TOKEN``."""
    return token or os.environ.get(TOKEN_ENV)


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
            raise UsageError(f"remote bench needs the device token; pass --token or set {TOKEN_ENV}")
        return RemoteSpec(host, int(port), key, token, **kw)


class DeviceLost(Exception):
    """The connection to a device broke (it stopped, crashed or the network dropped)."""



class DeviceLost(Exception):
    """The connection to a device broke (it stopped, crashed or the network dropped)."""
