"""``edgec ci edge.toml``: build every model of a project, measure it, and gate it.

Gates per model: latency budget (percentile point estimate <= budget), accuracy floor, and, against
a stored baseline, a latency regression test (one-sided Mann-Whitney U on the latency samples AND a
minimum slowdown of the median, so neither noise nor a trivial shift fails a build) and an accuracy
drop limit. Exit codes: 0 pass, 1 a gate failed, 2 usage/config error, 3 infrastructure error.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

from targets.base import CompileOptions
from toolchain.bench import device_for, prepare_job
from toolchain.ci.config import ModelSpec, Project, load_baseline, load_project
from toolchain.ci.report import markdown, write_reports
from toolchain.core.cache import Cache
from toolchain.core.errors import InfraError, UsageError
from toolchain.core.profile import load_profile
from toolchain.core.text import write_atomic
from toolchain.device.farm import Event
from toolchain.device.protocol import TOKEN_ENV, RemoteSpec
from toolchain.measure.stats import differences
from toolchain.pipeline import build_artifact


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    report: dict[str, Any]


def _measure(proj: Project, cache: Cache, token: str | None, on_event: Event | None) -> dict[str, dict[str, Any]]:
    """Build every model through the cached pipeline, then measure them all on the project's device."""
    jobs = {}
    for m in proj.models:
        prof = load_profile(m.profile)
        comp, src = build_artifact(m.source, prof, m.target, cache, passes=list(m.passes), data_dir=proj.data_dir,
                                   options=CompileOptions(for_device=proj.remote is not None))
        jobs[m.name] = prepare_job(comp, cache, profile=prof, data=m.data, data_dir=proj.data_dir,
                                   samples=proj.samples, duration_s=proj.duration_s, reference=src)
    remote = None
    if proj.remote is not None:
        r = proj.remote
        remote = RemoteSpec.parse(r["tracker"], r["key"], token or os.environ.get(r.get("token_env", TOKEN_ENV)),
                                  request_timeout_s=float(r.get("request_timeout_s", 120.0)))
    by_key = device_for(remote).run(list({j.art.key: j for j in jobs.values()}.values()), on_event)
    return {name: by_key[j.art.key] for name, j in jobs.items()}


def _regression(m: ModelSpec, res: dict[str, Any], base: dict[str, Any] | None, proj: Project) -> list[dict[str, Any]]:
    if base is None:
        return [{"gate": "regression", "status": "skipped", "message": "no baseline for this model yet "
                 "(run 'edgec ci --update-baseline')"}]
    diff = differences(res, base)
    if diff:
        return [{"gate": "regression", "status": "skipped",
                 "message": "baseline not comparable, not compared: " + "; ".join(diff)}]
    cur, old = np.asarray(res["latency_samples_ms"]), np.asarray(base["latency_samples_ms"])
    p = float(mannwhitneyu(cur, old, alternative="greater").pvalue)
    slow = float(np.median(cur) / np.median(old) - 1.0)
    failed = p < proj.alpha and slow >= proj.min_slowdown
    out = [{"gate": "latency-regression", "status": "failed" if failed else "passed", "p_value": p, "slowdown": slow,
            "message": f"{m.name}: median {np.median(cur):.4f} ms vs baseline {np.median(old):.4f} ms "
                       f"({slow:+.1%}), Mann-Whitney U one-sided p={p:.2g} (fail if p < {proj.alpha:g} "
                       f"and slowdown >= {proj.min_slowdown:.0%})"}]
    acc, bacc = (res.get("accuracy") or {}).get("task_accuracy"), (base.get("accuracy") or {}).get("task_accuracy")
    if acc is not None and bacc is not None:
        drop = bacc - acc
        out.append({"gate": "accuracy-regression", "status": "failed" if drop > proj.max_accuracy_drop else "passed",
                    "message": f"{m.name}: accuracy {acc:.4f} vs baseline {bacc:.4f} (drop {drop:+.4f}, "
                               f"limit {proj.max_accuracy_drop:g})"})
    return out


EMULATED_REFUSAL = ("latency measured on an emulated device is the emulator's, not a device time: no latency gate "
                    "is decided on it; measure on the real device (remote key without -emulated)")


def gates(m: ModelSpec, res: dict[str, Any], base: dict[str, Any] | None, proj: Project) -> list[dict[str, Any]]:
    lat = res["latency"]
    v, ci = lat[f"{m.metric}_ms"], lat["ci"][f"{m.metric}_ms"]
    if res.get("emulated"):
        out = [{"gate": "latency-budget", "status": "refused", "measured_ms": v, "budget_ms": m.budget_ms,
                "message": f"{m.name}: {EMULATED_REFUSAL}"}]
    else:
        out = [{"gate": "latency-budget", "status": "passed" if v <= m.budget_ms else "failed",
                "measured_ms": v, "budget_ms": m.budget_ms,
                "message": f"{m.name}: {m.metric} {v:.4f} ms (95% CI {ci[0]:.4f}-{ci[1]:.4f}) "
                           f"{'<=' if v <= m.budget_ms else '>'} budget {m.budget_ms:g} ms"}]
    if m.min_accuracy is not None:
        acc = (res.get("accuracy") or {}).get("task_accuracy")
        ok = acc is not None and acc >= m.min_accuracy
        out.append({"gate": "accuracy-floor", "status": "passed" if ok else "failed", "measured": acc,
                    "message": f"{m.name}: accuracy {acc if acc is None else f'{acc:.4f}'} "
                               f"{'>=' if ok else '<'} floor {m.min_accuracy:g}"})
    if res.get("emulated"):
        return [*out, {"gate": "regression", "status": "refused", "message": f"{m.name}: {EMULATED_REFUSAL}"}]
    return out + _regression(m, res, base, proj)


def run_ci(path: Path, cache: Any, update_baseline: bool = False, token: str | None = None,
           progress: bool = True, on_event: Any = None) -> Outcome:
    """Config errors raise UsageError (exit 2); infrastructure and gate outcomes come back as an Outcome."""

    proj = load_project(path)
    baseline = load_baseline(proj.baseline) if not update_baseline else {}  # a corrupt one fails before measuring
    t0 = time.monotonic()
    report: dict[str, Any] = {"project": proj.name, "file": str(path), "models": {}, "infra_error": None}
    try:
        results = _measure(proj, cache, token, on_event)
    except InfraError as e:
        report["infra_error"] = str(e)
        report["status"] = "infrastructure error"
        report["wall_s"] = round(time.monotonic() - t0, 1)
        write_reports(proj, report)
        return Outcome(3, report)
    failed = False
    for m in proj.models:
        res = results[m.name]
        g = gates(m, res, baseline.get("models", {}).get(m.name), proj)
        failed |= any(x["status"] == "failed" for x in g)
        slim = {k: v for k, v in res.items() if k != "latency_samples_ms"}
        report["models"][m.name] = {"spec": m.to_json(), "result": slim, "gates": g}
    emulated = sorted(m.name for m in proj.models if results[m.name].get("emulated"))
    if emulated:  # the report says what was measured (outputs and accuracy are real), then exit 2
        report["status"] = "refused: emulated latency"
        report["wall_s"] = round(time.monotonic() - t0, 1)
        write_reports(proj, report)
        raise UsageError(f"{', '.join(emulated)}: {EMULATED_REFUSAL}")
    if update_baseline:

        write_atomic(proj.baseline, json.dumps({"project": proj.name, "models": results}, default=str))
        report["baseline_written"] = str(proj.baseline)
    report["status"] = "failed" if failed else "passed"
    report["wall_s"] = round(time.monotonic() - t0, 1)
    write_reports(proj, report)
    return Outcome(1 if failed else 0, report)


def render_summary(rep: dict[str, Any]) -> str:

    return markdown(rep)


