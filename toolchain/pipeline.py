"""export -> optimize -> compile -> measure, as one readable function (``build``), and the compile step
with its checks. Every stage is a cached, content-addressed artifact."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from targets import get_target
from targets.base import BuildsOnDevice, CompileOptions
from toolchain.bench import LocalDevice, prepare_job, random_inputs
from toolchain.core.cache import Artifact, Cache
from toolchain.core.errors import SdkMissing, UsageError
from toolchain.core.onnx_io import input_specs, load_onnx, op_histogram, ort_session, param_count
from toolchain.core.profile import Profile, load_profile
from toolchain.core.versions import environment
from toolchain.export import export_model
from toolchain.measure.compare import compare
from toolchain.measure.timing import MeasureConfig, measure_interleaved
from toolchain.passes.manager import parse_passes, run_passes


def compile_artifact(art: Artifact, profile: Profile, target_name: str, cache: Cache,
                     options: CompileOptions = CompileOptions()) -> tuple[Artifact, bool]:
    """Compile an ONNX artifact for ``profile`` through ``target_name``, after checking the target is listed
    by the profile, available here, and takes every op. With ``options.for_device``, a target that builds on the
    device (TensorRT) returns what the device builds from instead, with no SDK needed here."""
    if art.kind != "onnx":
        raise UsageError(f"compile takes an ONNX artifact, got a {art.kind!r}")
    if target_name not in profile.targets:
        raise UsageError(f"profile {profile.id} does not list target {target_name!r}; "
                         f"use one of {', '.join(profile.targets)}")
    target = get_target(target_name)
    if options.for_device and isinstance(target, BuildsOnDevice):
        return target.device_artifact(art, profile, cache)  # the device builds it (and reports what it cannot)
    reason = target.available()
    if reason:
        raise SdkMissing(reason)
    cov = target.supports(load_onnx(art.payload, check=False), profile)
    if not cov.complete:
        ops = ", ".join(f"{op} ({why})" for op, why in cov.unsupported.items())
        raise UsageError(f"target {target_name} cannot take: {ops}; try another --target")
    return target.compile(art, profile, cache, options)


def build(model: str, profile_id: str, cache: Cache, *, targets: list[str] | None = None,
          passes: list[str] | None = None, input_shape: str | None = None, data: str | None = None,
          data_dir: Path | None = None, samples: int = 1000, duration_s: float | None = None,
          options: CompileOptions = CompileOptions(), batch: int = 1, progress: bool = True) -> dict[str, Any]:
    """All stages in one go: export -> passes (per target) -> compile per target -> measure the targets
    interleaved on this machine, each judged against the model before passes on ONNX Runtime; one report.
    With ``batch`` > 1, each target is also built for that batch and its throughput measured beside the
    batch-1 latency."""
    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}")
    t0 = time.monotonic()
    passes = passes or []
    profile = load_profile(profile_id)
    targets = targets or [t for t in profile.targets if get_target(t).available() is None]
    for t in targets:
        get_target(t)  # unknown names fail before any work
    parse_passes(passes)
    stages = ["export", "passes", *[f"compile:{t}" for t in targets], "bench", *(["throughput"] if batch > 1 else [])]
    bar = tqdm(total=len(stages), desc="build", disable=None if progress else True, unit="stage")

    bar.set_postfix_str("export")
    onnx_art, export_hit = export_model(model, cache, input_shape, data_dir=data_dir, progress=progress)
    bar.update(1)

    bar.set_postfix_str("passes")
    finals: dict[str, Artifact] = {}
    pass_reports: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        finals[t], pass_reports[t] = run_passes(onnx_art, passes, cache, profile=profile, data_dir=data_dir,
                                                target=t)
    bar.update(1)

    compiled: dict[str, tuple[Artifact, bool]] = {}
    for t in targets:
        bar.set_postfix_str(f"compile {t}")
        compiled[t] = compile_artifact(finals[t], profile, t, cache, options)
        bar.update(1)

    bar.set_postfix_str("bench")
    results = _measure_targets(compiled, onnx_art, cache, profile, data, data_dir, samples, duration_s)
    bar.update(1)
    if batch > 1:
        bar.set_postfix_str(f"throughput at batch {batch}")
        for t, tp in _measure_throughput(finals, onnx_art, profile, cache, batch, duration_s, options).items():
            results[t]["throughput"] = tp
        bar.update(1)
    bar.close()

    m = load_onnx(finals[targets[0]].payload, check=False)
    report: dict[str, Any] = {
        "model": model, "profile": profile.id,
        "onnx": {"artifact": onnx_art.key, "cache_hit": export_hit, "params": param_count(m),
                 "ops": op_histogram(m), "parity_vs_torch": onnx_art.meta.get("parity")},
        "passes": pass_reports, "final_onnx": {t: a.key for t, a in finals.items()}, "targets": results,
        "environment": environment(), "wall_s": round(time.monotonic() - t0, 2),
        "cache_hits": {"export": export_hit, **{t: h for t, (_, h) in compiled.items()}},
    }
    return report


def _measure_targets(compiled: dict[str, tuple[Artifact, bool]], reference: Artifact, cache: Cache,
                     profile: Profile, data: str | None, data_dir: Path | None, samples: int,
                     duration_s: float | None) -> dict[str, dict[str, Any]]:
    """Every target's artifact measured on this machine, interleaved round by round, and judged against the
    reference (the model before passes, on ONNX Runtime): the bench result schema of ``edgec bench``, plus
    what the build knows (cache hit, kernels, tuning)."""
    jobs = [prepare_job(art, cache, profile=profile, data=data, data_dir=data_dir, samples=samples,
                        duration_s=duration_s, reference=reference) for art, _ in compiled.values()]
    measured = LocalDevice().run(jobs)
    results: dict[str, dict[str, Any]] = {}
    for t, (art, hit) in compiled.items():
        res = dict(measured[art.key])
        res.pop("latency_samples_ms")  # raw samples stay in bench results; a build report stays readable
        res["cache_hit"] = hit
        res["kernels"] = get_target(t).kernels(art)
        res.update({k: art.meta[k] for k in ("tuning", "auto_tuning") if k in art.meta})  # what was tuned, why
        results[t] = res
    return results


def _measure_throughput(finals: dict[str, Artifact], reference: Artifact, profile: Profile, cache: Cache,
                        batch: int, duration_s: float | None,
                        options: CompileOptions) -> dict[str, dict[str, Any]]:
    """Each target built for ``batch`` inputs per call, measured interleaved: latency per call and items per
    second, and the batch's outputs checked against the reference (a batch build must compute the same)."""
    specs = input_specs(load_onnx(reference.payload, check=False), batch)
    if specs[0].shape[0] != batch:
        return {t: {"batch": batch, "skipped": f"the model's batch dimension is fixed at {specs[0].shape[0]}"}
                for t in finals}
    feed = {s.name: random_inputs(batch, s.shape, s.dtype, seed) for seed, s in enumerate(specs)}
    ref_out = ort_session(reference.payload, profile.bench.threads).run(None, feed)
    batched = dataclasses.replace(options, batch=batch)
    arts = {t: compile_artifact(a, profile, t, cache, batched)[0] for t, a in finals.items()}
    cfg = MeasureConfig.from_profile(profile.bench, duration_s)
    lats = measure_interleaved({t: (lambda t=t: get_target(t).load(arts[t]), feed) for t in arts}, cfg)
    out: dict[str, dict[str, Any]] = {}
    for t, art in arts.items():
        with get_target(t).load(art) as runner:
            got = runner.infer(feed)
        lat = lats[t]
        out[t] = {"batch": batch, "artifact": art.key, "p50_ms": lat.p50_ms, "ci_p50_ms": lat.ci["p50_ms"],
                  "stable": lat.stable, "items_per_s": batch / lat.p50_ms * 1000.0,
                  "agreement": compare(ref_out, got).to_json()}
    return out


def build_artifact(model: str, profile: Profile, target: str, cache: Cache, *, passes: list[str] | None = None,
                   data: str | None = None, data_dir: Path | None = None,
                   options: CompileOptions = CompileOptions()) -> tuple[Artifact, Artifact]:
    """(compiled artifact, the ONNX it was exported to before passes) through the cached pipeline: the
    unit ``pick`` and ``ci`` measure."""
    src, _ = export_model(model, cache, data_dir=data_dir, progress=False)
    final, _ = run_passes(src, passes or [], cache, profile=profile, data_dir=data_dir, target=target,
                          data_name=data)
    comp, _ = compile_artifact(final, profile, target, cache, options)
    return comp, src
