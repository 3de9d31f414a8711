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

from toolchain.ci_config import ModelSpec, Project, load_project
from toolchain.errors import EdgecError, InfraError, UsageError


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    report: dict[str, Any]


def _build(m: ModelSpec, cache: Any, data_dir: Path | None) -> tuple[Any, Any]:
    """(compiled artifact, reference ONNX artifact) through the cached pipeline."""
    from toolchain import api
    from toolchain.profile import load_profile

    prof = load_profile(m.profile)
    src, _ = api.export(m.source, cache, data_dir=data_dir, progress=False)
    final, _ = api.optimize(src, list(m.passes), cache, prof, data_dir, target=m.target) if m.passes else (src, [])
    comp, _ = api.compile(final, prof, m.target, cache)
    return comp, src


def _measure(proj: Project, cache: Any, token: str | None, on_event: Any) -> dict[str, dict[str, Any]]:
    from toolchain.bench import assemble, prepare_job, run_local
    from toolchain.profile import load_profile

    jobs = {}
    for m in proj.models:
        comp, src = _build(m, cache, proj.data_dir)
        jobs[m.name] = prepare_job(comp, cache, load_profile(m.profile), m.data, proj.data_dir, proj.samples,
                                   proj.duration_s, src)
    if proj.remote is None:
        return {name: assemble(j, run_local(j)) for name, j in jobs.items()}
    from toolchain.remote import RemoteSpec, bench_many

    r = proj.remote
    spec = RemoteSpec.parse(r["tracker"], r["key"], token or os.environ.get(r.get("token_env", "EDGEC_DEVICE_TOKEN")),
                            request_timeout_s=float(r.get("request_timeout_s", 120.0)))
    by_key = bench_many(list({j.art.key: j for j in jobs.values()}.values()), spec, on_event)
    return {name: by_key[j.art.key] for name, j in jobs.items()}


def _regression(m: ModelSpec, res: dict[str, Any], base: dict[str, Any] | None, proj: Project) -> list[dict[str, Any]]:
    import numpy as np
    from scipy.stats import mannwhitneyu

    from toolchain.stats import differences

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


def gates(m: ModelSpec, res: dict[str, Any], base: dict[str, Any] | None, proj: Project) -> list[dict[str, Any]]:
    lat = res["latency"]
    v, ci = lat[f"{m.metric}_ms"], lat["ci"][f"{m.metric}_ms"]
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
    return out + _regression(m, res, base, proj)


def run_ci(path: Path, cache: Any, update_baseline: bool = False, token: str | None = None,
           progress: bool = True, on_event: Any = None) -> Outcome:
    """Config errors raise UsageError (exit 2); infrastructure and gate outcomes come back as an Outcome."""
    from toolchain.ci_report import write_reports

    proj = load_project(path)
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
    baseline = json.loads(proj.baseline.read_text()) if proj.baseline.is_file() and not update_baseline else {}
    failed = False
    for m in proj.models:
        res = results[m.name]
        g = gates(m, res, baseline.get("models", {}).get(m.name), proj)
        failed |= any(x["status"] == "failed" for x in g)
        slim = {k: v for k, v in res.items() if k != "latency_samples_ms"}
        report["models"][m.name] = {"spec": m.to_json(), "result": slim, "gates": g}
    if update_baseline:
        from toolchain.report import write_atomic

        write_atomic(proj.baseline, json.dumps({"project": proj.name, "models": results}, default=str))
        report["baseline_written"] = str(proj.baseline)
    report["status"] = "failed" if failed else "passed"
    report["wall_s"] = round(time.monotonic() - t0, 1)
    write_reports(proj, report)
    return Outcome(1 if failed else 0, report)


def render_summary(rep: dict[str, Any]) -> str:
    from toolchain.ci_report import markdown

    return markdown(rep)


__all__ = ["EdgecError", "Outcome", "UsageError", "gates", "render_summary", "run_ci"]
