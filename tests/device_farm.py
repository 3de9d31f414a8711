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

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.tracker_port}"

    def add_device(self, token: str = TOKEN, log: Path | None = None) -> str:
        """Start a device server; with ``log``, it appends a JSON line per upload/module load there."""
        port = free_port()
        env = {**os.environ, "EDGEC_DEVICE_TOKEN": token}
        if log is not None:
            env["EDGEC_DEVICE_LOG"] = str(log)
        p = subprocess.Popen([str(BIN / "edgec"), "device", "serve", "--tracker", self.tracker, "--key", self.key,
                              "--port", str(port), "--port-end", str(port + 1)], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        addr = f"127.0.0.1:{port}"
        self.procs[addr] = p
        return addr

    def kill(self, addr: str) -> None:
        p = self.procs.pop(addr, None)
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the device process and its session children
            p.wait()

    def wait_devices(self, n: int, timeout: float = 90.0) -> list[str]:
        from toolchain.device.farm import RemoteSpec, devices

        spec = RemoteSpec("127.0.0.1", self.tracker_port, self.key, TOKEN)
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            try:
                found = devices(spec)
                if len(found) >= n:
                    return found
            except Exception:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{n} devices did not register within {timeout} s")

    def close(self) -> None:
        for addr in list(self.procs):
            self.kill(addr)


def start_farm(key: str, devices: int, log: Path | None = None) -> Farm:
    port = free_port()
    tr = subprocess.Popen([str(BIN / "python"), "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                           str(port), "--port-end", str(port + 1), "--silent"], start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    farm = Farm(port, key, {"tracker": tr})
    try:
        for _ in range(devices):
            farm.add_device(log=log)
        farm.wait_devices(devices)
    except BaseException:
        farm.close()
        raise
    return farm
