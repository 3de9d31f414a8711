"""Device profiles: ``profiles/<id>.toml`` validated into frozen dataclasses.

Unknown keys and bad values are errors naming the file and the key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import functools
import math
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomllib

import profiles as _profiles_pkg
from toolchain.core.errors import SdkMissing, UsageError

PROFILE_DIR = Path(_profiles_pkg.__file__).parent


@dataclass(frozen=True)
class CpuSpec:
    """The CPU the code runs on, as LLVM sees it."""

    arch: str  # "x86_64" | "aarch64"
    mtriple: str  # LLVM target triple, e.g. "x86_64-linux-gnu", "aarch64-linux-android"
    mcpu: str  # LLVM CPU name, e.g. "znver4", "cortex-a76"
    mattr: tuple[str, ...] = ()
    num_cores: int = 1
    vector_bits: int = 128  # SIMD register width: 512 AVX-512, 256 AVX2, 128 NEON (bounds kernels.vector_lanes)
    int8_dot: str = "none"  # "vnni" | "sdot" | "none": the int8 dot-product instruction, if any
    cross_cc: str | None = None  # C compiler that links a shared library for this CPU, when not the host's


@dataclass(frozen=True)
class GpuSpec:
    """An NVIDIA GPU reached through TensorRT."""

    name: str
    sm: int  # compute capability, e.g. 87 for Orin: part of a TensorRT engine's key (engines are per GPU)
    memory_mb: int  # bounds TensorRT's builder workspace (a quarter of it)
    fp16: bool = True
    sparse_tensor_cores: bool = False


@dataclass(frozen=True)
class KernelSpec:
    """Which hand-tuned kernel variants suit this device, and their tile/vector parameters."""

    use_gemv: bool = True  # batch-1 dense layers as the packed GEMV (kernels/tvm/tir/gemv.py)
    vector_lanes: int = 4  # fp32 lanes per vector register: a power of two, at most cpu.vector_bits / 32
    gemv_block_n: int = 32  # output rows per packed block
    # A run of dense layers whose packed weights total at most this many KB becomes one kernel
    # (kernels/tvm/tir/chain.py: saves the per-layer VM dispatch, ~0.6 us a layer here; mlp-1m's 1.48 MB int8
    # chain: 13.9-14.0 us vs 14.7-17.1 us as four kernels, called directly, interleaved); 0 turns it off.
    gemv_chain_max_kb: int = 2048
    unroll: int = 4
    use_fused_kan: bool = True
    use_fused_lif: bool = True
    # A spiking layer with at most this many T*B rows runs as one event-driven kernel (matmul + recurrence);
    # a longer one as the packed GEMV plus the fused recurrence. Measured (x86-avx512, a real test image):
    # T=8 the layer kernel is 1.08x faster than GEMV + recurrence, T=16 it is 1.33x slower.
    lif_layer_max_rows: int = 8
    use_grouped_matmul: bool = True
    # exp / sigmoid lowered as a vectorizable Cephes exp (kernels/tvm/tir/_elementwise.py, rel. error < 2.4e-7)
    # instead of libm expf per element.
    fast_exp: bool = True
    # Kernels that no hand-written kernel and no tuning record covers get a rule-based schedule
    # (inline + vectorize, kernels/tvm/schedule/vector_rule.py) instead of naive loops; "auto" tuning then skips the
    # light ones (elementwise, norms, pooling) and spends its budget on the heavy layers only.
    vector_rule: bool = True
    # fp32 Conv2d (groups 1 and depthwise) as the direct convolution kernels (kernels/tvm/tir/conv2d.py): a CNN runs
    # fast with no tuning. The register tile is conv_tile_ow output columns x conv_block_oc output channels:
    # conv_tile_ow x conv_block_oc / vector_lanes accumulators + conv_block_oc / vector_lanes weight vectors must fit
    # the vector register file (AVX-512 and NEON: 32, AVX2: 16).
    use_direct_conv: bool = True
    conv_block_oc: int = 16
    conv_tile_ow: int = 6
    # A model whose weight tensors total from contiguous_weights_min_kb to contiguous_weights_max_kb KB also gets an
    # entry point that takes them as arguments, and the runner keeps them in one buffer on huge-page boundaries
    # (targets/tvm/weights_as_inputs.py): weights that nearly fill L2 then spread over all its sets instead of
    # overfilling the sets that 4 KB pages at random physical addresses land on. Below the window no set overflows
    # and each argument costs the call ~60 ns; past L2 the weights stream from L3 / DRAM anyway. max 0 turns it off.
    contiguous_weights_min_kb: int = 1024
    contiguous_weights_max_kb: int = 2048


@dataclass(frozen=True)
class TuningSpec:
    """The default ("auto") tuning budget: MetaSchedule runs only where a heavy layer has no hand-written kernel."""

    # Trials when auto tuning triggers, all on the heavy layers (convkan: 0.54x ORT with 96 on its two convs, 8 min
    # from an empty database on this 2-core machine while another job ran; benchmarks/bench_tvm_tuned.py --cold).
    auto_trials: int = 96
    auto_min_mflops: float = 0.5  # a naive kernel below this much work is not worth tuning (elementwise, norms)
    # Wall-clock limit of an "auto" tuning run (seconds): batches start only while they fit, and the kernels it did
    # not cover are listed in the artifact's meta (tuning.uncovered).
    auto_budget_s: float = 300.0


@dataclass(frozen=True)
class BenchSpec:
    threads: int = 1
    warmup_s: float = 0.2
    duration_s: float = 1.0
    min_runs: int = 50


@dataclass(frozen=True)
class Profile:
    id: str
    name: str
    description: str
    os: str  # "linux" | "android"
    targets: tuple[str, ...]  # targets that can run here, best first
    cpu: CpuSpec
    gpu: GpuSpec | None = None
    kernels: KernelSpec = field(default_factory=KernelSpec)
    bench: BenchSpec = field(default_factory=BenchSpec)
    tuning: TuningSpec = field(default_factory=TuningSpec)

    @property
    def is_host_native(self) -> bool:
        """True when code built for this profile can run on this machine."""
        return self.cpu.arch == platform.machine() and self.cpu.cross_cc is None

    def tvm_target(self) -> dict[str, Any]:
        t: dict[str, Any] = {
            "kind": "llvm",
            "mtriple": self.cpu.mtriple,
            "mcpu": self.cpu.mcpu,
            "num-cores": self.cpu.num_cores,
        }
        if self.cpu.mattr:
            t["mattr"] = list(self.cpu.mattr)
        return t


_VALID = {
    ("cpu", "arch"): ("x86_64", "aarch64"),
    ("cpu", "int8_dot"): ("vnni", "sdot", "none"),
    ("", "os"): ("linux", "android"),
}
_KNOWN_TARGETS = ("ort", "tvm", "tensorrt")
# Inclusive bounds of every numeric field: a typo or a hostile value (threads = 100000, duration_s = inf) is an
# error naming the key, never a run that does not finish or exhausts memory.
_BOUNDS: dict[tuple[str, str], tuple[float, float]] = {
    ("cpu", "num_cores"): (1, 1024),
    ("cpu", "vector_bits"): (64, 2048),
    ("gpu", "sm"): (10, 200),
    ("gpu", "memory_mb"): (64, 1 << 22),
    ("kernels", "vector_lanes"): (1, 64),
    ("kernels", "gemv_block_n"): (1, 4096),
    ("kernels", "gemv_chain_max_kb"): (0, 1 << 20),
    ("kernels", "unroll"): (1, 64),
    ("kernels", "lif_layer_max_rows"): (0, 1 << 16),
    ("kernels", "conv_block_oc"): (1, 1024),
    ("kernels", "conv_tile_ow"): (1, 64),
    ("kernels", "contiguous_weights_min_kb"): (0, 1 << 20),
    ("kernels", "contiguous_weights_max_kb"): (0, 1 << 20),
    ("bench", "threads"): (1, 4096),  # and at most 4 x cpu.num_cores (parse_profile)
    ("bench", "warmup_s"): (0.0, 600.0),
    ("bench", "duration_s"): (0.001, 3600.0),
    ("bench", "min_runs"): (1, 1_000_000),
    ("tuning", "auto_trials"): (0, 100_000),
    ("tuning", "auto_min_mflops"): (0.0, 1e9),
    ("tuning", "auto_budget_s"): (1.0, 86400.0),
}


def _coerce(cls: type, data: dict[str, Any], where: str, section: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            raise UsageError(
                f"{where}: unknown key '{section + '.' if section else ''}{key}'; "
                f"valid keys are {', '.join(sorted(names))}"
            )
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        qual = f"{section + '.' if section else ''}{f.name}"
        sub = _dataclass_of(hint)
        if sub is not None:
            if not isinstance(value, dict):
                raise UsageError(f"{where}: '{qual}' must be a table [{qual}]")
            kwargs[f.name] = _coerce(sub, value, where, qual)
            continue
        kwargs[f.name] = _check_scalar(value, hint, where, qual)
        allowed = _VALID.get((section, f.name))
        if allowed and value not in allowed:
            raise UsageError(f"{where}: '{qual}' = {value!r} is not one of {', '.join(allowed)}")
        bounds = _BOUNDS.get((section, f.name))
        if bounds and not bounds[0] <= value <= bounds[1]:
            raise UsageError(f"{where}: '{qual}' = {value!r} is out of range; use a value from {bounds[0]:g} "
                             f"to {bounds[1]:g}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        missing = str(e).split("argument", 1)[-1].strip(": ")
        raise UsageError(f"{where}: missing required key(s) in [{section or 'top level'}]: {missing}") from None


def _dataclass_of(hint: Any) -> type | None:
    for cand in (hint, *get_args(hint)):
        if isinstance(cand, type) and hasattr(cand, "__dataclass_fields__"):
            return cand
    return None


def _check_scalar(value: Any, hint: Any, where: str, qual: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{where}: '{qual}' must be a list of strings, got {value!r}")
        return tuple(value)
    accepted = tuple(a for a in args if a is not type(None)) if args else (hint,)
    ok = any(
        (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t not in (int, float) and isinstance(value, t))
        for t in accepted
    )
    if not ok:
        names = " or ".join(getattr(t, "__name__", str(t)) for t in accepted)
        raise UsageError(f"{where}: '{qual}' must be {names}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{where}: '{qual}' must be a finite number, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise UsageError(f"{where}: '{qual}' must not be negative, got {value!r}")
    return float(value) if float in accepted and int not in accepted else value


def parse_profile(data: dict[str, Any], where: str) -> Profile:
    prof = _coerce(Profile, data, where, "")
    for t in prof.targets:
        if t not in _KNOWN_TARGETS:
            raise UsageError(f"{where}: 'targets' has unknown target {t!r}; known: {', '.join(_KNOWN_TARGETS)}")
    if "tensorrt" in prof.targets and prof.gpu is None:
        raise UsageError(f"{where}: target 'tensorrt' needs a [gpu] table")
    if not prof.targets:
        raise UsageError(f"{where}: 'targets' is empty; list at least one of {', '.join(_KNOWN_TARGETS)}")
    if prof.cpu.num_cores < 1 or prof.bench.threads < 1:
        raise UsageError(f"{where}: 'cpu.num_cores' and 'bench.threads' must be at least 1")
    if prof.bench.threads > 4 * prof.cpu.num_cores:
        raise UsageError(f"{where}: 'bench.threads' = {prof.bench.threads} is more than 4 x cpu.num_cores "
                         f"({4 * prof.cpu.num_cores}); use at most the device's cores")
    bits = prof.cpu.vector_bits
    if bits & (bits - 1):
        raise UsageError(f"{where}: 'cpu.vector_bits' = {bits} must be a power of two (128 NEON/SSE, 256 AVX2, "
                         "512 AVX-512)")
    triple_arch = prof.cpu.mtriple.split("-", 1)[0]
    if triple_arch != prof.cpu.arch:
        raise UsageError(f"{where}: 'cpu.mtriple' = {prof.cpu.mtriple!r} is not a {prof.cpu.arch} triple; "
                         f"write e.g. \"{prof.cpu.arch}-linux-gnu\"")
    lanes, max_lanes = prof.kernels.vector_lanes, prof.cpu.vector_bits // 32
    if lanes < 1 or lanes & (lanes - 1) or lanes > max_lanes:
        raise UsageError(f"{where}: 'kernels.vector_lanes' = {lanes} must be a power of two of at most "
                         f"cpu.vector_bits / 32 = {max_lanes}")
    if (prof.os == "android") != ("android" in prof.cpu.mtriple):
        raise UsageError(f"{where}: 'os' = {prof.os!r} does not match 'cpu.mtriple' = {prof.cpu.mtriple!r}; "
                         "Android profiles use an *-linux-android triple and os = \"android\"")
    return prof


def load_profile_file(path: Path) -> Profile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e}); fix the syntax") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; save the profile as UTF-8 TOML") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the profile ({e.strerror}); check the path") from None
    prof = parse_profile(data, str(path))
    if prof.id != path.stem:
        raise UsageError(f"{path}: 'id' = {prof.id!r} must match the file name {path.stem!r}")
    return prof


def profile_ids() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """A profile by id (``x86-avx512``) or by path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return load_profile_file(p)
    path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UsageError(
            f"unknown profile {name_or_path!r}; choose one of {', '.join(profile_ids())} "
            "(see 'edgec profiles list') or pass a .toml file"
        )
    return load_profile_file(path)


def all_profiles() -> list[Profile]:
    return [load_profile(i) for i in profile_ids()]


@functools.lru_cache(maxsize=32)
def _llvm_check(mtriple: str, mcpu: str) -> str | None:
    """Why TVM's LLVM cannot generate code for (mtriple, mcpu), or None. The architecture is checked before any
    Target is made from the triple: LLVM crashes the process (SIGSEGV) on an unknown one."""
    try:
        import tvm
        from tvm.target import codegen
    except ImportError as e:
        raise SdkMissing(f"TVM is not installed ({e}); pip install apache-tvm") from None
    arch = mtriple.split("-", 1)[0]
    known = [str(t) for t in codegen.llvm_get_targets()]
    if arch not in known:
        return (f"'cpu.mtriple' = {mtriple!r}: TVM's LLVM has no {arch!r} backend "
                f"(it has {', '.join(t for t in known if t in ('x86_64', 'aarch64', 'arm', 'riscv64'))}, ...)")
    cpus = {str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": mtriple}))}
    if mcpu not in cpus:
        near = sorted(c for c in cpus if c[:3] == mcpu[:3])[:6]
        return (f"'cpu.mcpu' = {mcpu!r} is not a CPU TVM's LLVM knows for {mtriple}"
                + (f" (similar: {', '.join(near)})" if near else ""))
    return None


def check_llvm_target(prof: Profile) -> None:
    """Refuse (UsageError) a profile whose triple architecture or ``mcpu`` TVM's LLVM does not know, before any
    codegen. Imports TVM: call it where TVM is about to be used."""
    why = _llvm_check(prof.cpu.mtriple, prof.cpu.mcpu)
    if why is not None:
        raise UsageError(f"profile {prof.id}: {why}; fix the profile")
