"""Pick the most accurate model that fits a latency budget with 95 % confidence.

A candidate is (model, pass chain, target). Each is built through the cached pipeline (export ->
passes -> compile) and benchmarked; bench results are cached artifacts keyed by the compiled
artifact and the bench configuration, so a second pick re-measures nothing. A candidate is within
budget only when the upper bound of the bootstrap confidence interval of its latency percentile is
at or below the budget.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
from tqdm import tqdm

from targets.base import CompileOptions
from toolchain.bench import device_for, prepare_job
from toolchain.core.cache import Artifact, Cache, StepKey
from toolchain.core.errors import EdgecError, UsageError
from toolchain.core.profile import Profile, load_profile
from toolchain.core.text import markdown_table, write_atomic
from toolchain.device.protocol import RemoteSpec
from toolchain.pipeline import build_artifact
from toolchain.search import require_measurable, variants_for
from toolchain.zoo.registry import entries

METRICS = ("p50", "p90", "p99")
BENCH_CONFIG_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    model: str
    passes: tuple[str, ...]
    target: str
    data: str | None = None

    @property
    def label(self) -> str:
        return f"{self.model} [{'+'.join(self.passes) or 'no passes'}] @{self.target}"


@dataclass(frozen=True)
class PickConfig:
    profile: str
    budget_ms: float
    metric: str = "p90"
    min_accuracy: float | None = None
    candidates: str = "zoo"
    report_dir: Path = Path("reports/pick")
    verify: int = 0  # re-measure the chosen candidate this many times
    duration_s: float | None = None
    data_dir: Path | None = None
    samples: int = 1000
    remote: RemoteSpec | None = None  # measure on the devices there instead of here
    # Accuracy is only comparable on one task: the zoo sweep keeps entries trained for this dataset.
    task: str = "fashion-mnist"


def zoo_candidates(profile: Profile, task: str = "fashion-mnist", runs_here: bool = True) -> list[Candidate]:
    """Every zoo entry for ``task`` x every way edgec builds it for the profile (``search.variants_for``: each
    target x fp32 / int8 / bf16 / modular), so "the most accurate model within the budget" considers every
    build. Entries of other tasks (Cora, a Fashion-MNIST class subset) are left out: their accuracies are not
    comparable with this task's; training-time-only entries (the GNN teachers) are not candidates. The whole zoo
    is a long sweep (make test-slow runs it)."""
    variants = variants_for(profile, runs_here, on_device=not runs_here)
    names = [name for name, e in entries().items() if e.dataset == task and e.deployable]
    if not names:
        tasks = sorted({e.dataset for e in entries().values()})
        raise UsageError(f"no zoo model is trained for task {task!r}; use --task with one of {', '.join(tasks)}")
    return [Candidate(name, v.passes, v.target) for name in names for v in variants]


def file_candidates(path: Path, profile: Profile, runs_here: bool = True) -> list[Candidate]:
    """TOML: optional [defaults] passes/targets, then [[candidate]] model = ..., passes = [[...]], targets = [...],
    data = ... (a candidate naming neither passes nor targets gets every variant of ``search.variants_for``)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: cannot read candidates ({e}); fix the file") from None
    d = data.get("defaults", {})
    out = []
    for i, c in enumerate(data.get("candidate", [])):
        if "model" not in c:
            raise UsageError(f"{path}: [[candidate]] #{i + 1} has no 'model'")
        chains, targets = c.get("passes", d.get("passes")), c.get("targets", d.get("targets"))
        if chains is None and targets is None:  # nothing said: every way edgec builds it for the profile
            out += [Candidate(str(c["model"]), v.passes, v.target, c.get("data", d.get("data")))
                    for v in variants_for(profile, runs_here, on_device=not runs_here)]
            continue
        chains = [["cleanup"]] if chains is None else chains
        if chains and isinstance(chains[0], str):
            chains = [chains]
        for chain in chains:
            for t in targets or list(profile.targets):
                if t not in profile.targets:
                    raise UsageError(f"{path}: target {t!r} is not on profile {profile.id} "
                                     f"({', '.join(profile.targets)})")
                out.append(Candidate(str(c["model"]), tuple(chain), t, c.get("data", d.get("data"))))
    if not out:
        raise UsageError(f"{path}: no [[candidate]] entries")
    return out


def cached_bench(comp: Artifact, cache: Cache, profile: Profile, reference: Artifact, data: str | None,
                 data_dir: Path | None, samples: int, duration_s: float | None,
                 remote: RemoteSpec | None = None) -> tuple[dict[str, Any], bool]:
    """A bench result stored as an artifact keyed by the compiled artifact + bench config + device key."""
    cfg = {"data": data, "samples": samples, "duration_s": duration_s or profile.bench.duration_s,
           "threads": profile.bench.threads, "reference": reference.key,
           "device": f"rpc:{remote.key}" if remote is not None else "local"}
    sk = StepKey("bench", (comp.key,), cfg, BENCH_CONFIG_VERSION, profile.id)

    def write(d: Path) -> tuple[str, dict[str, Any]]:
        job = prepare_job(comp, cache, profile=profile, data=data, data_dir=data_dir, samples=samples,
                          duration_s=duration_s, reference=reference)
        res = device_for(remote).run([job])[comp.key]
        (d / "result.json").write_text(json.dumps(res, default=str))
        return "result.json", {"artifact": comp.key}

    art, hit = cache.get_or_build(sk, "bench-result", write)
    return json.loads(art.payload.read_text()), hit


def measure_candidate(c: Candidate, profile: Profile, cache: Cache, cfg: PickConfig) -> dict[str, Any]:
    comp, onnx_art = build_artifact(c.model, profile, c.target, cache, passes=list(c.passes), data=c.data,
                                    data_dir=cfg.data_dir, options=CompileOptions(for_device=cfg.remote is not None))
    res, hit = cached_bench(comp, cache, profile, onnx_art, c.data, cfg.data_dir, cfg.samples, cfg.duration_s,
                            cfg.remote)
    return {"result": res, "bench_cache_hit": hit, "artifact": comp.key}


def _row(c: Candidate, m: dict[str, Any] | None, err: str | None, metric: str) -> dict[str, Any]:
    row: dict[str, Any] = {"label": c.label, "model": c.model, "passes": list(c.passes), "target": c.target}
    if err is not None:
        return {**row, "error": err}
    res = m["result"]  # type: ignore[index]
    lat = res["latency"]
    acc = res.get("accuracy")
    return {**row, "artifact": m["artifact"], "bench_cache_hit": m["bench_cache_hit"],  # type: ignore[index]
            "latency_ms": lat[f"{metric}_ms"], "ci_ms": lat["ci"][f"{metric}_ms"], "p50_ms": lat["p50_ms"],
            "stable": lat["stable"], "emulated": bool(res.get("emulated")),
            "accuracy": acc["task_accuracy"] if acc else None,
            "reference_accuracy": acc["reference_accuracy"] if acc else None, "size_bytes": res["size_bytes"]}


EMULATED_REFUSAL = ("latency measured on an emulated device is the emulator's, not a device time: pick gates no "
                    "budget on it; measure on the real device (remote key without -emulated)")


def refuse_emulated(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every measured row rejected: an emulated latency decides nothing."""
    for r in rows:
        if "error" in r:
            r["status"], r["reason"] = "rejected", f"could not be measured: {r['error']}"
        else:
            r["status"], r["reason"] = "rejected", EMULATED_REFUSAL
    return {"chosen": None, "runner_up": None, "why": EMULATED_REFUSAL}


def decide(rows: list[dict[str, Any]], budget_ms: float, min_accuracy: float | None, metric: str) -> dict[str, Any]:
    """Mark each row eligible or rejected (with the reason); choose the most accurate eligible one."""
    for r in rows:
        if "error" in r:
            r["status"], r["reason"] = "rejected", f"could not be measured: {r['error']}"
        elif r["accuracy"] is None:
            r["status"], r["reason"] = "rejected", "no labelled data to measure accuracy"
        elif r["ci_ms"][1] > budget_ms:
            r["status"] = "rejected"
            r["reason"] = (f"{metric} {r['latency_ms']:.4f} ms, upper 95% CI {r['ci_ms'][1]:.4f} ms > budget "
                           f"{budget_ms:g} ms")
        elif min_accuracy is not None and r["accuracy"] < min_accuracy:
            r["status"], r["reason"] = "rejected", f"accuracy {r['accuracy']:.4f} < floor {min_accuracy:g}"
        else:
            r["status"] = "eligible"
            r["reason"] = f"{metric} upper 95% CI {r['ci_ms'][1]:.4f} ms <= budget {budget_ms:g} ms"
    ok = sorted((r for r in rows if r["status"] == "eligible"), key=lambda r: (-r["accuracy"], r["latency_ms"]))
    chosen = ok[0] if ok else None
    runner = ok[1] if len(ok) > 1 else None
    if chosen:
        chosen["status"] = "chosen"
    if runner:
        runner["status"] = "runner-up"
        runner["reason"] += (f"; accuracy {runner['accuracy']:.4f} vs chosen {chosen['accuracy']:.4f}"  # type: ignore[index]
                             f" ({metric} {runner['latency_ms']:.4f} vs {chosen['latency_ms']:.4f} ms)")  # type: ignore[index]
    return {"chosen": chosen["label"] if chosen else None, "runner_up": runner["label"] if runner else None}


def pareto(rows: list[dict[str, Any]]) -> list[str]:
    """Labels of the measured candidates no other beats on both latency and accuracy."""
    pts = [r for r in rows if r.get("accuracy") is not None]
    front = []
    for r in pts:
        dominated = any(o is not r and o["latency_ms"] <= r["latency_ms"] and o["accuracy"] >= r["accuracy"]
                        and (o["latency_ms"] < r["latency_ms"] or o["accuracy"] > r["accuracy"]) for o in pts)
        if not dominated:
            front.append(r)
    return [r["label"] for r in sorted(front, key=lambda r: r["latency_ms"])]


def plot(rows: list[dict[str, Any]], front: list[str], budget_ms: float, metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in pts:
        lo, hi = r["ci_ms"]
        color = "tab:green" if r["status"] == "chosen" else "tab:blue" if r["label"] in front else "0.6"
        ax.errorbar(r["latency_ms"], r["accuracy"], xerr=[[r["latency_ms"] - lo], [hi - r["latency_ms"]]],
                    fmt="*" if r["status"] == "chosen" else "o", color=color, ms=12 if r["status"] == "chosen" else 5)
        if r["label"] in front:
            ax.annotate(r["label"], (r["latency_ms"], r["accuracy"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    fr = [r for r in pts if r["label"] in front]
    fr.sort(key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in fr], [r["accuracy"] for r in fr], "-", color="tab:blue", lw=1)
    ax.axvline(budget_ms, color="tab:red", ls="--", label=f"budget {budget_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel(f"{metric} latency (ms, log; bars: 95% CI)")
    ax.set_ylabel("task accuracy")
    ax.set_title("edgec pick: accuracy-latency Pareto front")
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def verify_choice(row: dict[str, Any], cache: Cache, profile: Profile, cfg: PickConfig) -> dict[str, Any]:
    """Re-measure the chosen artifact ``cfg.verify`` times (fresh load each time)."""
    art = cache.get(row["artifact"])
    assert art is not None
    job = prepare_job(art, cache, profile=profile, samples=64, duration_s=cfg.duration_s)
    device = device_for(cfg.remote)
    vals = [device.run([job])[art.key]["latency"][f"{cfg.metric}_ms"] for _ in range(cfg.verify)]
    return {"runs": len(vals), "within_budget": sum(v <= cfg.budget_ms for v in vals),
            f"{cfg.metric}_ms": [round(v, 6) for v in vals]}


def run_pick(cfg: PickConfig, cache: Cache, progress: bool = True) -> dict[str, Any]:
    if cfg.metric not in METRICS:
        raise UsageError(f"--metric {cfg.metric!r} must be one of {', '.join(METRICS)}")
    if cfg.budget_ms <= 0:
        raise UsageError("--budget-ms must be positive")
    t0 = time.monotonic()
    profile = load_profile(cfg.profile)
    require_measurable(profile, cfg.remote)
    here = cfg.remote is None  # measured on this machine: only what its CPU can run
    cands = (zoo_candidates(profile, cfg.task, here) if cfg.candidates == "zoo"
             else file_candidates(Path(cfg.candidates), profile, here))
    rows = []
    bar = tqdm(cands, desc="pick", unit="cand", disable=None if progress else True)
    for c in bar:
        bar.set_postfix_str(c.label[:50])
        try:
            rows.append(_row(c, measure_candidate(c, profile, cache, cfg), None, cfg.metric))
        except EdgecError as e:  # one broken candidate must not sink the pick; it is reported as rejected
            rows.append(_row(c, None, str(e), cfg.metric))
    bar.close()
    emulated = [r["label"] for r in rows if r.get("emulated")]
    choice = (refuse_emulated(rows) if emulated else decide(rows, cfg.budget_ms, cfg.min_accuracy, cfg.metric))
    front = pareto(rows)
    png = plot(rows, front, cfg.budget_ms, cfg.metric, cfg.report_dir / "pick.png")
    report: dict[str, Any] = {
        "profile": profile.id, "budget_ms": cfg.budget_ms, "metric": cfg.metric, "min_accuracy": cfg.min_accuracy,
        "candidates_source": cfg.candidates, **choice, "pareto_front": front, "candidates": rows, "plot": str(png),
        "bench_cache_hits": sum(1 for r in rows if r.get("bench_cache_hit")), "wall_s": round(time.monotonic() - t0, 1),
    }
    if cfg.verify and choice["chosen"]:
        row = next(r for r in rows if r["label"] == choice["chosen"])
        report["verify"] = verify_choice(row, cache, profile, cfg)
    write_atomic(cfg.report_dir / "pick.json", json.dumps(report, indent=2, default=str))
    write_atomic(cfg.report_dir / "pick.md", render_markdown(report))
    if emulated:  # the report shows what was measured (outputs and accuracy are real); no budget is gated
        raise UsageError(f"{len(emulated)} candidate(s) measured on an emulated device: {EMULATED_REFUSAL}")
    return report


def render_markdown(rep: dict[str, Any]) -> str:

    m = rep["metric"]
    lines = [f"# edgec pick: {rep['profile']}, budget {rep['budget_ms']:g} ms at {m}"
             + (f", accuracy >= {rep['min_accuracy']:g}" if rep["min_accuracy"] is not None else ""), ""]
    lines.append(f"**Chosen:** {rep['chosen'] or 'none fits the budget with 95% confidence'}")
    lines.append(f"**Runner-up:** {rep['runner_up'] or '-'}")
    if "verify" in rep:
        v = rep["verify"]
        lines.append(f"**Re-measured:** {v['within_budget']}/{v['runs']} runs within budget at {m}")
    lines += ["", f"Pareto front (fastest first): {', '.join(rep['pareto_front']) or '-'}", "",
              f"Plot: {rep['plot']}  ·  {rep['bench_cache_hits']} of {len(rep['candidates'])} measurements from the "
              f"cache  ·  {rep['wall_s']} s", ""]
    rows = []
    for r in rep["candidates"]:
        lat = f"{r['latency_ms']:.4f} [{r['ci_ms'][0]:.4f}, {r['ci_ms'][1]:.4f}]" if "latency_ms" in r else "-"
        lat += " (emulated, not a device time)" if r.get("emulated") else ""
        acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "-"
        rows.append([r["label"], lat, acc, r["status"], r["reason"].replace("|", "/")])
    lines.append(markdown_table(["candidate", f"{m} ms [95% CI]", "accuracy", "status", "why"], rows))
    return "\n".join(lines) + "\n"
