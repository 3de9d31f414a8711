"""Toolchain and SDK versions, recorded in every manifest and every benchmark result."""

from __future__ import annotations

import functools
import importlib.metadata as md
import platform
import time
from typing import Any

_PACKAGES = ("edgec", "onnx", "onnxruntime", "onnxscript", "apache-tvm", "torch", "numpy", "tensorrt")


@functools.cache
def versions() -> dict[str, str]:
    """Installed versions of the packages that shape a build's output (absent ones omitted)."""
    found: dict[str, str] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_governor() -> str | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Where and when a measurement was taken: versions, CPU, governor, UTC date."""
    return {"versions": versions(), "cpu": cpu_model(), "governor": cpu_governor(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
