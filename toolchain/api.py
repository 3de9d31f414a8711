"""The Python API behind every CLI verb. Each function takes explicit inputs and returns plain data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.cache import Artifact, Cache, StepKey
from toolchain.errors import SdkMissing, UsageError
from toolchain.onnx_io import fix_batch, input_specs, load_onnx, op_histogram, param_count
from toolchain.profile import Profile, load_profile
from toolchain.versions import cpu_governor, cpu_model, versions


def _log(progress: bool, msg: str) -> None:
    if progress:
        import sys

        print(f"[edgec] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- export / optimize / compile


def export(model: str, cache: Cache, input_shape: str | None = None, weights: Path | None = None,
           data_dir: Path | None = None, form: str | None = None, progress: bool = True) -> tuple[Artifact, bool]:
    from toolchain.export import export_model

    return export_model(model, cache, input_shape, weights, data_dir, form, progress)


def optimize(art: Artifact, pass_texts: list[str], cache: Cache, profile: Profile | None = None,
             data_dir: Path | None = None, target: str = "ort", data_name: str | None = None,
             only_if_faster: bool = False) -> tuple[Artifact, list[dict[str, Any]]]:
    """Apply passes in order; each is its own cached artifact. ``data_name`` names the labelled set for passes
    that need one (default: the model's own dataset); ``only_if_faster`` turns it on for every pass that has it."""
    import dataclasses

    from toolchain.passes import PassContext, config_dict, parse_pass

    parsed = [parse_pass(t) for t in pass_texts]  # validate every pass before running any
    if only_if_faster:
        parsed = [(s, dataclasses.replace(c, only_if_faster=True) if hasattr(c, "only_if_faster") else c)
                  for s, c in parsed]
    reports: list[dict[str, Any]] = []
    data = None
    for spec, cfg in parsed:
        if data is None and getattr(cfg, "needs_data", False):
            data = _dataset_for(art, data_dir, data_name)
        ctx = PassContext(profile=profile, cache=cache, data=data, target=target)
        keyed = {**config_dict(cfg), **({"data": data_name} if data_name and getattr(cfg, "needs_data", False) else {})}
        keyed["target"] = target  # passes may choose forms or measure speed for the target
        sk = StepKey(f"pass:{spec.name}", (art.key,), keyed, spec.version,
                     profile.id if profile else None)
        model = None

        def write(d: Path, spec=spec, cfg=cfg, ctx=ctx) -> tuple[str, dict[str, Any]]:
            nonlocal model
            import onnx

            res = spec.fn()(load_onnx(art.payload, check=False), cfg, ctx)
            onnx.checker.check_model(res.model, full_check=True)
            onnx.save_model(res.model, d / "model.onnx")
            return "model.onnx", {**art.meta, "pass": spec.name, "modified": res.modified, "report": res.report}

        art, hit = cache.get_or_build(sk, "onnx", write)
        reports.append({"pass": spec.name, "config": config_dict(cfg), "artifact": art.key, "cache_hit": hit,
                        "modified": art.meta.get("modified"), "report": art.meta.get("report")})
    return art, reports


def compile(art: Artifact, profile: Profile, target_name: str, cache: Cache) -> tuple[Artifact, bool]:
    from targets import get_target

    if art.kind != "onnx":
        raise UsageError(f"compile takes an ONNX artifact, got a {art.kind!r}")
    if target_name not in profile.targets:
        raise UsageError(f"profile {profile.id} does not list target {target_name!r}; use one of {', '.join(profile.targets)}")
    target = get_target(target_name)
    reason = target.available()
    if reason:
        raise SdkMissing(reason)
    cov = target.supports(load_onnx(art.payload, check=False), profile)
    if not cov.complete:
        ops = ", ".join(f"{op} ({why})" for op, why in cov.unsupported.items())
        raise UsageError(f"target {target_name} cannot take: {ops}; try another --target")
    return target.compile(art, profile, cache)


# ---------------------------------------------------------------- bench


def _dataset_for(art: Artifact, data_dir: Path | None, data: str | None = None) -> Any:
    from toolchain.zoo.datasets import load_dataset

    name = data or art.meta.get("dataset")
    return load_dataset(name, data_dir) if name else None


def source_onnx(art: Artifact, cache: Cache) -> Artifact:
    """The ONNX artifact a compiled artifact was built from."""
    src = cache.get(str(art.meta.get("source", "")))
    if src is None or src.kind != "onnx":
        raise UsageError(f"the source ONNX of {art.key[:12]} is not in the cache; rebuild it")
    return src


def resolve_artifact(ref: str, cache: Cache) -> Artifact:
    """An artifact by key / key prefix, or by a path to its cache directory or manifest."""
    p = Path(ref)
    if p.is_dir() and (p / "manifest.json").is_file():
        return cache.get(p.name) or Artifact(p.name, p, json.loads((p / "manifest.json").read_text()))
    if p.name == "manifest.json" and p.is_file():
        return Artifact(p.parent.name, p.parent, json.loads(p.read_text()))
    art = cache.find(ref)
    if art is None:
        raise UsageError(f"no artifact {ref!r} in cache {cache.root}; pass a key printed by 'edgec compile'")
    return art


def bench(art: Artifact, cache: Cache, profile: Profile | None = None, data: str | None = None,
          data_dir: Path | None = None, samples: int = 1000, duration_s: float | None = None,
          reference: Artifact | None = None, remote: Any = None) -> dict[str, Any]:
    """Latency (steady warm-up, block-bootstrap CIs, stable flag), agreement with the source ONNX on ONNX
    Runtime, task accuracy where labelled data exists, size and runner memory. ``remote``: a
    ``toolchain.remote.RemoteSpec`` to run on a device through a TVM RPC tracker instead of here."""
    from toolchain.bench import assemble, prepare_job, run_local

    job = prepare_job(art, cache, profile, data, data_dir, samples, duration_s, reference)
    if remote is not None:
        from toolchain.remote import bench_many

        return bench_many([job], remote)[art.key]
    return assemble(job, run_local(job))


def _eval_inputs(ds: Any, samples: int, shape: tuple[int, ...]) -> np.ndarray:
    """The labelled test inputs (first ``samples``; 0 = all), or 64 seeded random inputs without data."""
    if ds is None:
        return np.random.default_rng(0).standard_normal((64, *shape[1:])).astype(np.float32)
    n = len(ds.x_test) if samples <= 0 else min(samples, len(ds.x_test))
    return ds.x_test[:n].astype(np.float32)


def quality(runner: Any, ref: Any, name: str, shape: tuple[int, ...], x: np.ndarray, ds: Any,
            ref_out: np.ndarray | None = None) -> dict[str, Any]:
    """Agreement with the reference runner and, with labels, task accuracy of both (one pass each)."""
    from toolchain.bench import run_batched, task_accuracy
    from toolchain.export import compare

    got = run_batched(runner, name, x, shape)
    ref_out = run_batched(ref, name, x, shape) if ref_out is None else ref_out
    out: dict[str, Any] = {"agreement": compare([ref_out], [got]).to_json()}
    if ds is not None:
        out["accuracy"] = {"dataset": ds.name, "samples": int(len(x)),
                           "task_accuracy": task_accuracy(got, ds.y_test),
                           "reference_accuracy": task_accuracy(ref_out, ds.y_test)}
    return out


def environment() -> dict[str, Any]:
    return {"versions": versions(), "cpu": cpu_model(), "governor": cpu_governor(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------- build


def build(model: str, profile_id: str, targets: list[str] | None, passes: list[str], cache: Cache,
          input_shape: str | None = None, data: str | None = None, data_dir: Path | None = None,
          samples: int = 1000, duration_s: float | None = None, progress: bool = True) -> dict[str, Any]:
    """All stages in one go: export -> passes -> compile per target -> interleaved bench; one report."""
    from tqdm import tqdm

    from targets import get_target
    from targets.ort import OrtRunner
    from toolchain.bench import measure_interleaved, run_batched
    from toolchain.passes import parse_pass

    t0 = time.monotonic()
    profile = load_profile(profile_id)
    targets = targets or [t for t in profile.targets if get_target(t).available() is None]
    for t in targets:
        get_target(t)  # unknown names fail before any work
    for p in passes:
        parse_pass(p)
    stages = ["export", "passes", *[f"compile:{t}" for t in targets], "bench"]
    bar = tqdm(total=len(stages), desc="build", disable=None if progress else True, unit="stage")
    bar.set_postfix_str("export")
    onnx_art, export_hit = export(model, cache, input_shape, data_dir=data_dir, progress=progress)
    bar.update(1)
    bar.set_postfix_str("passes")
    # Passes run per target: a pass may pick a lowering form for, or measure speed on, that target.
    finals: dict[str, Artifact] = {}
    pass_reports: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        finals[t], pass_reports[t] = optimize(onnx_art, passes, cache, profile, data_dir, target=t) \
            if passes else (onnx_art, [])
    bar.update(1)
    compiled: dict[str, tuple[Artifact, bool]] = {}
    for t in targets:
        bar.set_postfix_str(f"compile {t}")
        compiled[t] = compile(finals[t], profile, t, cache)
        bar.update(1)
    final = finals[targets[0]]
    bar.set_postfix_str("bench")
    m = load_onnx(final.payload, check=False)
    spec = input_specs(fix_batch(m, 1))[0]
    ds = _dataset_for(onnx_art, data_dir, data)
    x = _eval_inputs(ds, samples, spec.shape)
    feed = {spec.name: x[:1].reshape(spec.shape)}
    runners = {t: get_target(t).load(a) for t, (a, _) in compiled.items()}
    # The reference is the model before passes, on ONNX Runtime: passes are judged too.
    ref = OrtRunner(onnx_art.payload, profile.bench.threads)
    try:
        lats = measure_interleaved({t: (r, feed) for t, r in runners.items()}, profile.bench.warmup_s,
                                   duration_s or profile.bench.duration_s, profile.bench.min_runs,
                                   threads=profile.bench.threads)
        ref_out = run_batched(ref, spec.name, x, spec.shape)
        results: dict[str, Any] = {}
        for t, r in runners.items():
            art, hit = compiled[t]
            res: dict[str, Any] = {"artifact": art.key, "cache_hit": hit, "size_bytes": art.payload.stat().st_size,
                                   "latency": lats[t].to_json()}
            res.update(quality(r, ref, spec.name, spec.shape, x, ds, ref_out))
            tgt = get_target(t)
            if hasattr(tgt, "kernels"):
                res["kernels"] = tgt.kernels(art)
            res.update({k: art.meta[k] for k in ("tuning", "auto_tuning") if k in art.meta})  # what was tuned, why
            results[t] = res
    finally:
        for r in runners.values():
            r.__exit__(None, None, None)
    bar.update(1)
    bar.close()
    report: dict[str, Any] = {
        "model": model, "profile": profile.id,
        "onnx": {"artifact": onnx_art.key, "cache_hit": export_hit, "params": param_count(m),
                 "ops": op_histogram(m), "parity_vs_torch": onnx_art.meta.get("parity")},
        "passes": pass_reports, "final_onnx": {t: a.key for t, a in finals.items()}, "targets": results,
        "environment": environment(), "wall_s": round(time.monotonic() - t0, 2),
        "cache_hits": {"export": export_hit, **{t: h for t, (_, h) in compiled.items()}},
    }
    if "tvm" in results and "ort" in results:
        report["tvm_vs_ort_p50_ratio"] = results["tvm"]["latency"]["p50_ms"] / results["ort"]["latency"]["p50_ms"]
    return report


# ---------------------------------------------------------------- inspect


def inspect(ref: str, cache: Cache, profile_id: str = "x86-avx512") -> dict[str, Any]:
    """Describe an ONNX file (inputs, ops, params, per-target coverage) or a cached artifact."""
    from targets import REGISTRY, get_target, target_for_artifact

    p = Path(ref)
    if p.suffix == ".onnx" and p.is_file():
        m = load_onnx(p)
        prof = load_profile(profile_id)
        cov = {}
        for t in REGISTRY:
            tgt = get_target(t)
            cov[t] = tgt.supports(m, prof).to_json() if tgt.available() is None else {"unavailable": tgt.available()}
        return {"file": str(p), "opset": [(o.domain or "ai.onnx", o.version) for o in m.opset_import],
                "inputs": [s.to_json() for s in input_specs(m)], "outputs": [o.name for o in m.graph.output],
                "params": param_count(m), "ops": op_histogram(m), "coverage": cov}
    art = resolve_artifact(ref, cache)
    out: dict[str, Any] = {"artifact": art.key, "kind": art.kind, "dir": str(art.dir),
                           "verified": cache.verify(art), "manifest": art.manifest}
    if art.kind in ("tvm-lib", "ort-model", "trt-engine"):
        tgt = target_for_artifact(art)
        out["kernels"] = tgt.kernels(art) if hasattr(tgt, "kernels") else []
    return out
