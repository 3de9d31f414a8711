"""``edgec inspect``: what an ONNX file is (inputs, ops, params, per-target coverage) or what a cached
artifact is (manifest, integrity, kernels per layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from targets import KIND_TO_TARGET, REGISTRY, get_target, target_for_artifact
from toolchain.core.cache import Artifact, Cache
from toolchain.core.errors import UsageError
from toolchain.core.onnx_io import input_specs, load_onnx, op_histogram, param_count
from toolchain.core.profile import load_profile


def resolve_artifact(ref: str, cache: Cache) -> Artifact:
    """An artifact by key / key prefix, or by a path to its cache directory or manifest."""
    p = Path(ref)
    entry = p if p.is_dir() and (p / "manifest.json").is_file() else p.parent if p.name == "manifest.json" else None
    if entry is not None and p.exists():
        found = cache.get(entry.name) if cache.holds(Artifact(entry.name, entry, {})) else None
        art = found or cache.artifact_at(entry)
        if art is None:
            raise UsageError(f"{entry / 'manifest.json'} is not a readable edgec manifest (truncated or edited); "
                             "rebuild the artifact")
        return art
    art = cache.find(ref)
    if art is None:
        raise UsageError(f"no artifact {ref!r} in cache {cache.root}; pass a key printed by 'edgec compile'")
    return art


def describe_onnx(path: Path, profile_id: str) -> dict[str, Any]:
    m = load_onnx(path)
    prof = load_profile(profile_id)
    cov = {}
    for t in REGISTRY:
        tgt = get_target(t)
        why = tgt.available()
        cov[t] = tgt.supports(m, prof).to_json() if why is None else {"unavailable": why}
    return {"file": str(path), "opset": [(o.domain or "ai.onnx", o.version) for o in m.opset_import],
            "inputs": [s.to_json() for s in input_specs(m)], "outputs": [o.name for o in m.graph.output],
            "params": param_count(m), "ops": op_histogram(m), "coverage": cov}


def describe_artifact(art: Artifact, cache: Cache) -> dict[str, Any]:
    verified = cache.verify(art)
    out: dict[str, Any] = {"artifact": art.key, "kind": art.kind, "dir": str(art.dir),
                           "verified": verified, "manifest": art.manifest}
    if art.kind in KIND_TO_TARGET:
        if verified and cache.holds(art):  # timing kernels loads the library: only a verified cache entry
            out["kernels"] = target_for_artifact(art).kernels(art)
        else:
            out["kernels"] = [dict(r) for r in art.meta.get("kernels", [])]
            out["kernel_timing"] = "skipped: the entry fails verification or lies outside the cache"
    return out


def inspect(ref: str, cache: Cache, profile_id: str = "x86-avx512") -> dict[str, Any]:
    """Describe an ONNX file or a cached artifact (by key, key prefix or directory)."""
    p = Path(ref)
    if p.suffix == ".onnx" and p.is_file():
        return describe_onnx(p, profile_id)
    return describe_artifact(resolve_artifact(ref, cache), cache)
