"""Build a TVM library: import, run the pipeline, link (cross-linking for ARM), describe what was built."""

from __future__ import annotations

import hashlib
from pathlib import Path
from shutil import which
from typing import Any

import onnx

import kernels.tvm as kernels_pkg
from kernels.tvm.tir.conv2d import DEPTHWISE_KERNEL_NAME
from kernels.tvm.tir.conv2d import KERNEL_NAME as CONV_KERNEL_NAME
from targets.tvm.database import kernel_choices, naive_kernels
from targets.tvm.elf import android_problems
from targets.tvm.frontend import import_onnx, import_tvm, tvm_target
from targets.tvm.inspect import kernel_table
from targets.tvm.pipeline import pipeline
from toolchain.core.errors import InfraError, SdkMissing
from toolchain.core.onnx_io import fix_batch, input_specs
from toolchain.core.profile import Profile, check_llvm_target


def kernel_sources_digest() -> str:
    """Hash of the hand-written kernel sources (every kernels/tvm Python file, in subfolders too, but the
    test helpers ``testing.py`` and any ``test_*.py``): editing a kernel must not reuse stale libraries."""
    root = Path(kernels_pkg.__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        if p.name != "testing.py" and not p.name.startswith("test_"):
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


def build_library(model: onnx.ModelProto, profile: Profile, out: Path,
                  tuning_db: Path | None = None, batch: int = 1) -> dict[str, Any]:
    """Import, lower and link ``model`` for ``profile`` into the shared library ``out``, for inputs of ``batch``
    samples (the batch-1 kernels take batch 1 only; a larger batch runs the generic lowering + vector rule)."""
    check_llvm_target(profile)
    tvm = import_tvm()
    choices = kernel_choices(tuning_db) if tuning_db is not None else {}
    generic = frozenset(k for k, c in choices.items() if c.get("origin") == "tuned")
    steps, mod, naive = _lower(model, profile, tuning_db, generic, batch)
    if generic and any("conv2d" in n for n in naive):
        # A conv layer left to its tuned schedule found no record in the whole model (its fused kernel is not the
        # one the layer was tuned and compared as): every conv takes the hand-written kernel rather than run naive.
        generic = frozenset()
        steps, mod, naive = _lower(model, profile, tuning_db, generic, batch)
    kernels = kernel_table(mod)
    if tuning_db is not None:  # which conv kernel each layer kept: the hand-written one or its tuned schedule
        for row in kernels:
            if row["kernel"] in (CONV_KERNEL_NAME, DEPTHWISE_KERNEL_NAME):
                row["choice"] = "hand"
            elif row["origin"] == "tuned" and "conv2d" in row["name"]:
                row["choice"] = "tuned"
    target = tvm_target(profile)
    ex = tvm.compile(mod, target, relax_pipeline=None)
    _export(ex, profile, out)
    return {
        "triple": profile.cpu.mtriple,
        "mcpu": profile.cpu.mcpu,
        "pipeline": [n for n, _ in steps],
        "kernels": kernels,
        "batch": batch,
        "inputs": [s.to_json() for s in input_specs(fix_batch(model, batch), batch)],
        "elf_machine": elf_machine(out),
        # Kernels the tuning database had no record for (the rule may still have scheduled them) ...
        "naive_after_tuning": naive,
        # ... and those that run as naive loops in this library (neither hand-written, tuned nor rule).
        "naive": naive_kernels(mod),
        # conv layers whose tuned schedule measured faster than the hand-written kernel, with both times
        **({"conv_tuned": {k: choices[k] for k in sorted(generic)}} if tuning_db is not None else {}),
    }


def _lower(model: onnx.ModelProto, profile: Profile, tuning_db: Path | None, conv_generic: frozenset[str],
           batch: int) -> tuple[Any, Any, list[str]]:
    """(steps, the lowered module, kernels the tuning database left naive) of ``model`` for ``profile``."""
    mod = import_onnx(model, batch)
    steps = pipeline(profile, tuning_db, conv_generic)
    naive: list[str] = []
    for name, step in steps:
        mod = step(mod)
        if name == "apply-tuning-db":
            naive = naive_kernels(mod)  # checked right after applying, before the vector rule
    return steps, mod, naive


# Android: no NDK offline. clang + lld link for the Android triple without the C library (the kernels call
# nothing from it that the process has not loaded already), 16 KB-aligned segments (Android 15).
ANDROID_API = 24


def android_link_options(profile: Profile) -> list[str]:
    triple = profile.cpu.mtriple if profile.cpu.mtriple[-1].isdigit() else f"{profile.cpu.mtriple}{ANDROID_API}"
    return [f"--target={triple}", "-fuse-ld=lld", "-nostdlib", "-Wl,-z,max-page-size=16384",
            "-Wl,-z,separate-loadable-segments", "-Wl,-z,text", "-Wl,--hash-style=both"]


def library_linker(profile: Profile) -> tuple[str | None, list[str]]:
    """(compiler, options) that link a library for ``profile`` (None: the host compiler). The final build and
    MetaSchedule's tuning candidates (targets.tvm.tuning) both link with it, so what is timed is what ships."""
    if profile.os == "android":
        missing = [t for t in ("clang", "ld.lld") if which(t) is None]
        if missing:
            raise SdkMissing(f"{' and '.join(missing)} not found: the Android library is linked by clang + lld "
                             "(apt-get install clang lld)")
        return "clang", android_link_options(profile)
    if profile.cpu.cross_cc:
        if which(profile.cpu.cross_cc) is None:
            raise SdkMissing(
                f"cross compiler {profile.cpu.cross_cc} not found; apt-get install gcc-aarch64-linux-gnu"
            )
        return profile.cpu.cross_cc, []
    return None, []


def _export(ex: Any, profile: Profile, out: Path) -> None:
    from tvm.support import cc

    compiler, options = library_linker(profile)
    if profile.os == "android":
        ex.export_library(str(out), fcompile=cc.cross_compiler(compiler, options=options))
        problems = android_problems(out)
        if problems:
            out.unlink()
            raise InfraError(f"the {profile.id} library would not load on Android: {'; '.join(problems)}")
    elif compiler is not None:
        ex.export_library(str(out), fcompile=cc.cross_compiler(compiler, options=options))
    else:
        ex.export_library(str(out))


def elf_machine(path: Path) -> str:
    """The ELF e_machine of a shared library: 'x86_64', 'aarch64' or the raw number."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        return "not-elf"
    code = int.from_bytes(head[18:20], "little")
    return {62: "x86_64", 183: "aarch64", 40: "arm"}.get(code, str(code))
