"""The fastest artifact for a model on a profile, chosen for the user.

Every way edgec can build the model for the profile (each target the profile lists and this machine can
build x each pass chain: fp32, int8 dynamic, int8 static, bf16 where the target computes it, the modular
lowering where the model is block-sparse) is built through the cached pipeline, measured on the device
(here, interleaved round by round, or on the devices behind a tracker), and judged on the labelled test set
against the model before passes on ONNX Runtime. The fastest variant whose accuracy drop stays within
``max_drop`` points is chosen; without labels, the bound applies to argmax agreement with the reference.
A variant that fails to build or run is reported with its reason, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from targets import get_target
from targets.base import BuildsOnDevice, CompileOptions
from toolchain.bench import device_for, prepare_job
from toolchain.core.cache import Artifact, Cache
from toolchain.core.errors import EdgecError, UsageError
from toolchain.core.profile import Profile
from toolchain.core.versions import cpu_flags
from toolchain.device.protocol import RemoteSpec
from toolchain.export import export_model
from toolchain.measure.job import BenchJob
from toolchain.passes.manager import run_passes
from toolchain.pipeline import compile_artifact

# Pass chains tried on every target (a chain whose passes change nothing is skipped: it would only
# re-measure fp32). bf16 on TVM is the weight-only form (bf16 weights, fp32 arithmetic): it runs on any CPU.
PASS_CHAINS: tuple[tuple[str, ...], ...] = (
    ("cleanup",),
    ("cleanup", "int8"),
    ("cleanup", "int8=mode=static"),
    ("cleanup", "modular"),
    ("cleanup", "bf16"),
)
BF16_TARGETS = ("tvm",)


@dataclass(frozen=True)
class Variant:
    """One way to build a model: a target and a pass chain."""

    target: str
    passes: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.target} [{'+'.join(self.passes)}]"


def variants_for(profile: Profile, runs_here: bool = False, on_device: bool = False) -> list[Variant]:
    """Every (target, pass chain) edgec can build for ``profile`` on this machine. ``runs_here``: the variants
    will run on this machine, so ones its CPU cannot execute (bf16 on a CPU without avx512_bf16, whatever the
    profile's CPU has) are left out (``skipped_here`` says why). ``on_device``: they run on a remote device, so a
    target that builds there (TensorRT) counts even where this machine lacks its SDK."""
    out = []
    for target in profile.targets:
        t = get_target(target)
        if t.available() is not None and not (on_device and isinstance(t, BuildsOnDevice)):
            continue
        for chain in PASS_CHAINS:
            if "bf16" in chain and target not in BF16_TARGETS:
                continue
            if runs_here and skipped_here(chain):
                continue
            out.append(Variant(target, chain))
    return out


def skipped_here(chain: tuple[str, ...]) -> str | None:
    """Why this machine cannot run a pass chain (None: it can): bf16 arithmetic (the pass's compute form) needs
    avx512_bf16, whatever the profile's device has."""
    if any(p.startswith("bf16") and "form=compute" in p for p in chain) and "avx512_bf16" not in cpu_flags():
        return "this machine's CPU has no avx512_bf16; measure bf16 on the device (--tracker)"
    return None


def require_measurable(profile: Profile, remote: RemoteSpec | None) -> None:
    """A latency decision needs the profile's own hardware: refuse rather than time the wrong machine."""
    if remote is None and not profile.is_host_native:
        raise UsageError(f"profile {profile.id} runs on {profile.cpu.arch}; this machine cannot measure it. Start "
                         "'edgec device serve' on the device and pass --tracker HOST:PORT --key KEY")


def _build(variant: Variant, src: Artifact, profile: Profile, cache: Cache, data: str | None,
           data_dir: Path | None, options: CompileOptions) -> tuple[Artifact | None, str | None]:
    """(compiled artifact, None), or (None, why it was skipped or failed)."""
    try:
        final, reports = run_passes(src, list(variant.passes), cache, profile=profile, data_dir=data_dir,
                                    target=variant.target, data_name=data)
        if len(variant.passes) > 1 and not any(r["modified"] for r in reports[1:]):
            return None, "skipped: the passes change nothing in this model"
        comp, _ = compile_artifact(final, profile, variant.target, cache, options)
    except EdgecError as e:
        return None, f"failed: {e}"
    except Exception as e:  # noqa: BLE001 -- one variant an SDK cannot build must not sink the search
        return None, f"failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return comp, None


def judge(res: dict[str, Any], max_drop: float) -> tuple[float | None, bool, str]:
    """(accuracy drop in points or None, within bound, why) for one measured variant."""
    acc = res.get("accuracy")
    if acc is not None:
        drop = (acc["reference_accuracy"] - acc["task_accuracy"]) * 100.0
        ok = drop <= max_drop
        return drop, ok, f"accuracy drop {drop:.2f} pt {'<=' if ok else '>'} {max_drop:g} pt"
    agree = res["agreement"]["argmax_agreement"]
    ok = (1.0 - agree) * 100.0 <= max_drop and res["agreement"].get("nonfinite", 0) == 0
    return None, ok, f"argmax agreement {agree:.2%} with the reference (no labels)"


def fastest(model: str, profile: Profile, cache: Cache, *, max_drop: float = 1.0, data: str | None = None,
            data_dir: Path | None = None, samples: int = 0, duration_s: float | None = None,
            remote: RemoteSpec | None = None, options: CompileOptions = CompileOptions(),
            input_shape: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Build every variant of ``model`` for ``profile``, measure them together, choose the fastest within the
    accuracy bound. Returns a report: one row per variant (measured, skipped or failed) and the choice."""
    if max_drop < 0 or max_drop != max_drop:
        raise UsageError(f"--max-drop must be a number >= 0 (accuracy points), got {max_drop}")
    require_measurable(profile, remote)
    t0 = time.monotonic()
    src, _ = export_model(model, cache, input_shape, data_dir=data_dir, progress=progress)
    rows: list[dict[str, Any]] = []
    jobs: dict[str, BenchJob] = {}
    labels: dict[str, str] = {}
    if remote is not None:
        options = dataclasses.replace(options, for_device=True)
    bar = tqdm(variants_for(profile, on_device=remote is not None), desc="variants", unit="build",
               disable=None if progress else True)
    for v in bar:
        bar.set_postfix_str(v.label)
        row: dict[str, Any] = {"label": v.label, "target": v.target, "passes": list(v.passes)}
        cannot = skipped_here(v.passes) if remote is None else None
        if cannot:
            rows.append({**row, "status": "skipped", "reason": f"skipped: {cannot}"})
            continue
        comp, why = _build(v, src, profile, cache, data, data_dir, options)
        if comp is None:
            rows.append({**row, "status": "skipped" if why and why.startswith("skipped") else "failed",
                         "reason": why})
            continue
        if comp.key in jobs:  # two chains that build the same artifact are one candidate
            rows.append({**row, "status": "skipped", "reason": f"same artifact as {labels[comp.key]}"})
            continue
        jobs[comp.key] = prepare_job(comp, cache, profile=profile, data=data, data_dir=data_dir, samples=samples,
                                     duration_s=duration_s, reference=src)
        labels[comp.key] = v.label
        rows.append({**row, "artifact": comp.key, "status": "measured"})
    bar.close()
    measured = device_for(remote).run(list(jobs.values())) if jobs else {}
    for row in rows:
        res = measured.get(row.get("artifact", ""))
        if res is None:
            continue
        drop, ok, why = judge(res, max_drop)
        lat = res["latency"]
        row.update(p50_ms=lat["p50_ms"], p90_ms=lat["p90_ms"], ci_p50_ms=lat["ci"]["p50_ms"], stable=lat["stable"],
                   accuracy=(res.get("accuracy") or {}).get("task_accuracy"), drop_points=drop,
                   agreement=res["agreement"], size_bytes=res["size_bytes"], within_bound=ok, reason=why)
    eligible = sorted((r for r in rows if r.get("within_bound")), key=lambda r: r["p50_ms"])
    chosen = eligible[0] if eligible else None
    if chosen is not None:
        chosen["status"] = "chosen"
        for r in eligible[1:]:
            overlap = r["ci_p50_ms"][0] <= chosen["ci_p50_ms"][1]
            r["status"] = "slower" + (" (intervals overlap)" if overlap else "")
    for r in rows:
        if r["status"] == "measured":
            r["status"] = "out of bound"
    ref = next(iter(measured.values()), None)
    return {"model": model, "profile": profile.id, "max_drop_points": max_drop,
            "device": ref["device"] if ref else None, "reference": src.key,
            "reference_accuracy": ((ref or {}).get("accuracy") or {}).get("reference_accuracy"),
            "chosen": chosen["label"] if chosen else None, "artifact": chosen["artifact"] if chosen else None,
            "variants": rows, "wall_s": round(time.monotonic() - t0, 1)}
