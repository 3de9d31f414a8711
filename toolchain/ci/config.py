"""The ``edge.toml`` project file of ``edgec ci``, validated strictly (a typo is exit code 2, never a default).

    [project]
    name = "my-app"
    baseline = "edge-baseline.json"   # relative to this file
    reports = "edge-reports"          # JSON, JUnit XML and markdown go here
    profile = "x86-avx512"            # default for every model
    duration_s = 1.0                  # timed seconds per model (optional)
    samples = 1000                    # labelled test samples for accuracy (optional)

    [gates]                           # optional
    alpha = 0.01                      # Mann-Whitney U significance for a latency regression
    min_slowdown = 0.10               # ... and the median must be at least this much slower
    max_accuracy_drop = 0.01          # absolute accuracy drop allowed vs the baseline

    [remote]                          # optional: measure on devices behind a TVM RPC tracker
    tracker = "127.0.0.1:9190"
    key = "x86-avx512"
    token_env = "EDGEC_DEVICE_TOKEN"

    [[model]]
    name = "classifier"
    source = "mlp-small"              # zoo name or .onnx path (relative to this file)
    data = "fashion-mnist"            # labelled set (zoo models default to their own)
    passes = ["cleanup"]
    target = "ort"
    budget_ms = 0.5
    metric = "p90"                    # p50 | p90 | p99
    min_accuracy = 0.8
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tomllib

from toolchain.core.errors import UsageError
from toolchain.core.profile import load_profile
from toolchain.passes import parse_pass

_PROJECT_KEYS = {"name", "baseline", "reports", "profile", "duration_s", "samples", "data_dir"}
_GATE_KEYS = {"alpha", "min_slowdown", "max_accuracy_drop"}
_REMOTE_KEYS = {"tracker", "key", "token_env", "request_timeout_s"}
_MODEL_KEYS = {"name", "source", "data", "passes", "target", "profile", "budget_ms", "metric", "min_accuracy"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    target: str
    profile: str
    budget_ms: float
    metric: str = "p90"
    passes: tuple[str, ...] = ()
    data: str | None = None
    min_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Project:
    name: str
    file: Path
    models: tuple[ModelSpec, ...]
    baseline: Path
    reports: Path
    duration_s: float | None = None
    samples: int = 1000
    data_dir: Path | None = None
    alpha: float = 0.01
    min_slowdown: float = 0.10
    max_accuracy_drop: float = 0.01
    remote: dict[str, Any] | None = None


def _unknown(where: str, table: dict[str, Any], allowed: set[str]) -> None:
    bad = sorted(set(table) - allowed)
    if bad:
        raise UsageError(f"{where}: unknown key(s) {', '.join(bad)}; valid: {', '.join(sorted(allowed))}")


def _num(where: str, v: Any, name: str, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        bound = f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}]"
        raise UsageError(f"{where}: '{name}' must be a finite number {bound}, got {v!r}")
    return float(v)


def _table(where: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise UsageError(f"{where} must be a table of keys, got {type(v).__name__} {v!r}; see edgec ci --help")
    return v


def load_baseline(path: Path) -> dict[str, Any]:
    """The stored baseline (``{"project": ..., "models": {name: result}}``); a missing file is an empty one, a
    corrupt or misshapen one is a UsageError that says to rewrite it."""
    if not path.is_file():
        if path.exists():
            raise UsageError(f"baseline {path} is not a file; point [project] baseline at a JSON file")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"baseline {path} is not valid JSON ({type(e).__name__}); "
                         "rewrite it with edgec ci --update-baseline") from None
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict) or not all(
            isinstance(r, dict) for r in data.get("models", {}).values()):
        raise UsageError(f"baseline {path} is not an edgec baseline (an object with a 'models' object); "
                         "rewrite it with edgec ci --update-baseline")
    return data


def _model(where: str, d: Any, root: Path, default_profile: str | None) -> ModelSpec:
    d = _table(where, d)
    _unknown(where, d, _MODEL_KEYS)
    for req in ("name", "source", "budget_ms"):
        if req not in d:
            raise UsageError(f"{where}: missing required key '{req}'")
    src = str(d["source"])
    if src.endswith(".onnx"):
        p = Path(src) if Path(src).is_absolute() else root / src
        if not p.is_file():
            raise UsageError(f"{where}: source {src!r} not found (looked at {p}); fix the path")
        src = str(p)
    profile = d.get("profile", default_profile)
    if not profile:
        raise UsageError(f"{where}: no 'profile' (set it on the model or in [project])")

    prof = load_profile(str(profile))
    target = str(d.get("target", prof.targets[0]))
    if target not in prof.targets:
        raise UsageError(f"{where}: target {target!r} is not on profile {prof.id} ({', '.join(prof.targets)})")
    metric = str(d.get("metric", "p90"))
    if metric not in ("p50", "p90", "p99"):
        raise UsageError(f"{where}: 'metric' must be p50, p90 or p99, got {metric!r}")
    passes = d.get("passes", [])
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise UsageError(f"{where}: 'passes' must be a list of strings")

    for p in passes:
        parse_pass(p)
    acc = d.get("min_accuracy")
    return ModelSpec(str(d["name"]), src, target, prof.id, _num(where, d["budget_ms"], "budget_ms"), metric,
                     tuple(passes), d.get("data"), None if acc is None else _num(where, acc, "min_accuracy", 0.0, 1.0))


def load_project(path: Path) -> Project:
    if not path.is_file():
        raise UsageError(f"project file {path} not found; pass the path to your edge.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e}); fix the syntax") from None
    _unknown(str(path), data, {"project", "gates", "remote", "model"})
    proj = _table(f"{path} [project]", data.get("project", {}))
    _unknown(f"{path} [project]", proj, _PROJECT_KEYS)
    gates = _table(f"{path} [gates]", data.get("gates", {}))
    _unknown(f"{path} [gates]", gates, _GATE_KEYS)
    remote = data.get("remote")
    if remote is not None:
        remote = _table(f"{path} [remote]", remote)
        _unknown(f"{path} [remote]", remote, _REMOTE_KEYS)
        if "tracker" not in remote or "key" not in remote:
            raise UsageError(f"{path} [remote]: needs 'tracker' (HOST:PORT) and 'key'")
    root = path.resolve().parent
    models = data.get("model", [])
    if not isinstance(models, list) or not models:
        raise UsageError(f"{path}: no [[model]] tables; add at least one model to gate")
    specs = tuple(_model(f"{path} [[model]] #{i + 1}", m, root, proj.get("profile")) for i, m in enumerate(models))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: model names must be unique, got {names}")
    dd = proj.get("data_dir")
    for key in ("name", "baseline", "reports", "profile", "data_dir"):
        if key in proj and not isinstance(proj[key], str):
            raise UsageError(f"{path} [project]: '{key}' must be a string, got {proj[key]!r}")
    reports = root / proj.get("reports", "edge-reports")
    if reports.exists() and not reports.is_dir():
        raise UsageError(f"{path} [project]: reports {reports} is a file; name a directory for the reports")
    return Project(
        name=str(proj.get("name", path.stem)), file=path, models=specs,
        baseline=root / proj.get("baseline", "edge-baseline.json"),
        reports=reports,
        duration_s=_num(str(path), proj["duration_s"], "duration_s") if "duration_s" in proj else None,
        samples=int(_num(str(path), proj.get("samples", 1000), "samples")),
        data_dir=(root / dd) if dd else None,
        alpha=_num(f"{path} [gates]", gates.get("alpha", 0.01), "alpha", 1e-9, 0.5),
        min_slowdown=_num(f"{path} [gates]", gates.get("min_slowdown", 0.10), "min_slowdown"),
        max_accuracy_drop=_num(f"{path} [gates]", gates.get("max_accuracy_drop", 0.01), "max_accuracy_drop", 0.0, 1.0),
        remote=remote,
    )
