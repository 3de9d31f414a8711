"""``edgec device serve``: the lean device runtime (``device.runtime``) on a machine with the whole toolchain,
plus the runners only that toolchain has (TensorRT engines, through ``targets``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from targets import load_runner
from toolchain.device.runtime import DeviceServer, RunnerFactory, available_runners


def _trt_runner(path: Path, input_names: list[str], threads: int) -> Any:
    return load_runner("trt-engine", path, input_names, threads)


def runners() -> dict[str, RunnerFactory]:
    """The lean runtime's runners, and TensorRT where it is installed."""
    found = available_runners()
    if importlib.util.find_spec("tensorrt") is not None:
        found["trt-engine"] = _trt_runner
    return found


def serve(tracker: tuple[str, int] | None, key: str, token: str, host: str = "127.0.0.1", port: int = 9090,
          port_end: int = 9199, session_timeout_s: float = 0.0, custom_addr: str | None = None) -> DeviceServer:
    """A bound, registered device server (``.port``); call ``serve_forever()`` on it."""
    return DeviceServer(token, key, tracker, host, port, port_end, runners(), session_timeout_s,
                        custom_addr=custom_addr)
