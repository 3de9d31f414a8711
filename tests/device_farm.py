"""A real TVM RPC tracker and edgec device servers on loopback, each in its own process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-6f1c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Farm:
    tracker_port: int
    key: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # "tracker" | "host:port" -> process
    logs: dict[str, Path] = field(default_factory=dict)  # "host:port" -> the device's stderr
    log_dir: Path | None = None

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.tracker_port}"

    def add_device(self, token: str = TOKEN, log: Path | None = None, key: str | None = None, lean: bool = False,
                   env: dict[str, str] | None = None) -> str:
        """Start a device server: ``edgec device serve``, or with ``lean`` the lean runtime
        (``python -m toolchain.device.runtime``). With ``log``, it appends a JSON line per upload/module load
        there."""
        port = free_port()
        full_env = {**os.environ, "EDGEC_DEVICE_TOKEN": token, **(env or {})}
        if log is not None:
            full_env["EDGEC_DEVICE_LOG"] = str(log)
        args = ["--tracker", self.tracker, "--key", key or self.key, "--port", str(port), "--port-end", str(port + 1)]
        if lean:
            full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH")) if p)
            cmd = [str(BIN / "python"), "-m", "toolchain.device.runtime", *args]
        else:
            cmd = [str(BIN / "edgec"), "device", "serve", *args]
        addr = f"127.0.0.1:{port}"
        err = subprocess.DEVNULL
        if self.log_dir is not None:
            self.logs[addr] = self.log_dir / f"device-{port}.log"
            err = self.logs[addr].open("w")
        p = subprocess.Popen(cmd, env=full_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err,
                             cwd=REPO)
        self.procs[addr] = p
        return addr

    def log_text(self, addr: str) -> str:
        path = self.logs.get(addr)
        return path.read_text() if path is not None and path.is_file() else ""

    def kill(self, addr: str) -> None:
        p = self.procs.pop(addr, None)
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the device process and its session children
            p.wait()

    def wait_devices(self, n: int, timeout: float = 90.0, key: str | None = None) -> list[str]:
        from toolchain.core.errors import InfraError
        from toolchain.device.protocol import RemoteSpec
        from toolchain.device.session import devices

        spec = RemoteSpec("127.0.0.1", self.tracker_port, key or self.key, TOKEN)
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            try:
                found = devices(spec)
                if len(found) >= n:
                    return found
            except InfraError:  # the tracker is still starting
                pass
            for addr, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"device {addr} exited with {p.returncode}: {self.log_text(addr)[-2000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"{n} devices did not register within {timeout} s")

    def close(self) -> None:
        for addr in list(self.procs):
            self.kill(addr)


def start_tracker(key: str, log_dir: Path | None = None) -> Farm:
    port = free_port()
    tr = subprocess.Popen([str(BIN / "python"), "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                           str(port), "--port-end", str(port + 1), "--silent"], start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Farm(port, key, {"tracker": tr}, log_dir=log_dir)


def start_farm(key: str, devices: int, log: Path | None = None, lean: bool = False) -> Farm:
    farm = start_tracker(key)
    try:
        for _ in range(devices):
            farm.add_device(log=log, lean=lean)
        farm.wait_devices(devices)
    except BaseException:
        farm.close()
        raise
    return farm
