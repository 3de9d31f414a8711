"""An emulated aarch64 device on this machine: the lean device runtime (``device.runtime``) run by an aarch64
Python under qemu-user, registered at a tracker under ``<profile>-emulated``.

Provisioning, once, into ``emulator_dir()`` (offline after that): Debian's arm64 packages of Python 3.11 and the
C/C++ runtime (``apt-get download`` with a private package list, nothing changes in the system's apt or dpkg
state) unpacked into a sysroot, and the aarch64 wheels of TVM, tvm-ffi (the host's versions: the handshake refuses
others) and numpy installed into a site folder. The runtime serves each session in a forked process, so no
aarch64 interpreter is re-executed and binfmt is not needed.

What an emulated device proves: the library loads and runs on aarch64 and computes the right numbers, and the
remote protocol works end to end. Its latency is the emulator's, not a device's: every result it gives carries
``"emulated": true``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolchain.core.errors import InfraError, UsageError
from toolchain.core.profile import Profile

EMULATOR_DIR_ENV = "EDGEC_EMULATOR_DIR"
PYTHON = "python3.11"
# Debian 12 (bookworm) arm64 packages: an aarch64 CPython 3.11 and what it and TVM's runtime link against.
DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libstdc++6", "libgcc-s1",
        "libgomp1", "zlib1g", "libexpat1", "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libsqlite3-0",
        "libncursesw6", "libtinfo6", "libreadline8", "libuuid1", "libdb5.3", "libgdbm6", "libcrypt1")
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
# Besides TVM and tvm-ffi: what they import at start (scipy, xgboost and the compiler's extras are not needed).
WHEEL_DEPS = ("ml_dtypes", "typing_extensions", "psutil", "cloudpickle", "tornado", "packaging")
REPO = Path(__file__).resolve().parents[2]
# qemu-user's CPU model per profile ``mcpu``: the emulated CPU has that core's instruction set, so a library that
# uses an extension the device lacks (i8mm, SVE) stops with SIGILL instead of running. QEMU 7.2 models no
# Cortex-A78; its instruction set as the profiles use it (Armv8.2-A, NEON, dotprod) is the Cortex-A76's.
QEMU_CPUS = {"cortex-a76": "cortex-a76", "cortex-a78": "cortex-a76"}
QEMU_CPU_FALLBACK = "max"  # a core QEMU does not model: every extension it emulates


def emulator_dir() -> Path:
    """Where the emulator is provisioned: ``$EDGEC_EMULATOR_DIR``, else ``~/.cache/edgec/emulator``, one folder
    per (TVM, tvm-ffi) version pair."""
    root = os.environ.get(EMULATOR_DIR_ENV)
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base = Path(root) if root else xdg / "edgec" / "emulator"
    return base / f"aarch64-py311-tvm{_host_version('apache-tvm')}-ffi{_host_version('apache-tvm-ffi')}"


def _host_version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        raise InfraError(f"{dist} is not installed here; pip install -e . first") from None


def key_for(profile: Profile) -> str:
    return f"{profile.id}-emulated"


def qemu_cpu(profile: Profile) -> str:
    """The ``qemu-aarch64 -cpu`` model of the profile's core (``QEMU_CPUS``), else ``max``."""
    return QEMU_CPUS.get(profile.cpu.mcpu, QEMU_CPU_FALLBACK)


def check_profile(profile: Profile) -> None:
    if profile.cpu.arch != "aarch64":
        raise UsageError(f"profile {profile.id} is {profile.cpu.arch}, not aarch64: there is nothing to emulate; "
                         "benchmark it on this machine or on the device")


def missing_tools() -> str | None:
    """Why this machine cannot provision or run the emulator, or None."""
    for tool, pkg in (("qemu-aarch64", "qemu-user"), ("apt-get", "apt"), ("dpkg", "dpkg")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {pkg})"
    return None


def is_ready(d: Path | None = None) -> bool:
    return ((d or emulator_dir()) / "ready.json").is_file()


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise InfraError(f"{what} failed ({tail[0][:200]}); check the network and rerun")


def provision(log: bool = True) -> Path:
    """Provision the emulator once (a few minutes and ~150 MB of downloads); returns its folder."""
    d = emulator_dir()
    if is_ready(d):
        return d
    why = missing_tools()
    if why:
        raise InfraError(f"cannot provision the aarch64 emulator: {why}")
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
    t0 = time.monotonic()
    try:
        apt = ["apt-get", "-q", "-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
               "-o", f"Dir::State::Lists={tmp / 'apt' / 'lists'}", "-o", f"Dir::Cache={tmp / 'apt' / 'cache'}",
               "-o", "APT::Sandbox::User=root"]
        for sub in ("apt/lists/partial", "apt/cache/archives/partial", "debs", "sysroot", "wheels"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        _say(log, "aarch64 emulator: Debian arm64 package lists")
        _run([*apt, "update"], "apt-get update (arm64 lists)")
        _say(log, f"aarch64 emulator: {len(DEBS)} arm64 packages")
        _run([*apt, "download", *DEBS], "apt-get download (arm64 packages)", cwd=tmp / "debs")
        for deb in sorted((tmp / "debs").glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(tmp / "sysroot")], f"dpkg -x {deb.name}")
        wheels = [f"apache-tvm=={_host_version('apache-tvm')}", f"apache-tvm-ffi=={_host_version('apache-tvm-ffi')}",
                  f"numpy=={_host_version('numpy')}", *WHEEL_DEPS]
        pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
        plat = ["--platform", WHEEL_PLATFORM, "--python-version", "3.11", "--only-binary=:all:", "--no-deps"]
        _say(log, "aarch64 emulator: aarch64 wheels (TVM's is ~95 MB)")
        _run([*pip, "download", "-d", str(tmp / "wheels"), *plat, *wheels], "pip download (aarch64 wheels)")
        _run([*pip, "install", "--target", str(tmp / "site"), *plat,
              *sorted(str(w) for w in (tmp / "wheels").glob("*.whl"))], "pip install --target (aarch64 wheels)")
        shutil.rmtree(tmp / "apt")
        shutil.rmtree(tmp / "debs")
        shutil.rmtree(tmp / "wheels")
        python = tmp / "sysroot" / "usr" / "bin" / PYTHON
        if not python.is_file():
            raise InfraError(f"the arm64 packages did not contain {PYTHON}; remove {d.parent} and rerun")
        (tmp / "ready.json").write_text(json.dumps({"wheels": wheels, "debs": list(DEBS),
                                                     "seconds": round(time.monotonic() - t0, 1)}))
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(log, f"aarch64 emulator ready in {d} ({time.monotonic() - t0:.0f} s)")
    return d


def _say(log: bool, msg: str) -> None:
    if log:
        print(msg, file=sys.stderr, flush=True)


def runtime_command(tracker: str, key: str, port: int, port_end: int, d: Path | None = None,
                    cpu: str = QEMU_CPU_FALLBACK) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the lean device runtime under qemu-aarch64 emulating CPU model ``cpu``
    (``qemu_cpu(profile)``); the token comes from the caller's ``$EDGEC_DEVICE_TOKEN``."""
    d = d or emulator_dir()
    sysroot = d / "sysroot"
    argv = ["qemu-aarch64", "-cpu", cpu, "-L", str(sysroot), str(sysroot / "usr" / "bin" / PYTHON),
            "-m", "toolchain.device.runtime", "--tracker", tracker, "--key", key, "--port", str(port),
            "--port-end", str(port_end), "--emulated"]
    env = {**os.environ, "QEMU_LD_PREFIX": str(sysroot), "PYTHONPATH": os.pathsep.join((str(d / "site"), str(REPO))),
           "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONHOME", None)
    return argv, env
