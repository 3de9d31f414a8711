"""The build report: one table per build, as text for the terminal and as markdown + JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolchain.core.text import markdown_table, table, write_atomic


def _us(ms: float) -> str:
    return f"{ms * 1000:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def _ci(lat: dict[str, Any]) -> str:
    lo, hi = lat["ci"]["p50_ms"]
    return f"{_us(lo)} - {_us(hi)}"


def build_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = ["target", "p50", "p50 95% CI", "p90", "p99", "runs", "stable", "max rel err", "argmax agree",
               "accuracy", "ref acc", "size", "kernels", "cached"]
    rows = []
    for t, r in report["targets"].items():
        lat, ag, acc = r["latency"], r["agreement"], r.get("accuracy")
        kernels = r.get("kernels") or []
        origins: dict[str, int] = {}
        for k in kernels:
            origins[k["origin"]] = origins.get(k["origin"], 0) + 1
        rows.append([
            t, _us(lat["p50_ms"]), _ci(lat), _us(lat["p90_ms"]), _us(lat["p99_ms"]), lat["runs"],
            "yes" if lat.get("stable") else "NO",
            f"{ag['max_rel']:.1e}", f"{ag['argmax_agreement'] * 100:.1f}%",
            f"{acc['task_accuracy'] * 100:.2f}%" if acc else "-",
            f"{acc['reference_accuracy'] * 100:.2f}%" if acc else "-",
            f"{r['size_bytes'] / 1024:.0f} KiB",
            ", ".join(f"{n} {o}" for o, n in origins.items()) or "-",
            "yes" if r["cache_hit"] else "no",
        ])
    return headers, rows


def _summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"model {report['model']}  profile {report['profile']}  params {report['onnx']['params']:,}  "
             f"wall {report['wall_s']} s"]
    names = next((", ".join(p["pass"] for p in ps) for ps in report["passes"].values() if ps), "")
    if names:
        lines.append(f"passes: {names}")
    for t, r in report["targets"].items():
        tp = r.get("throughput")
        if tp and "items_per_s" in tp:
            lines.append(f"{t} at batch {tp['batch']}: {_us(tp['p50_ms'])} per call, {tp['items_per_s']:,.0f} items/s "
                         f"(max rel err {tp['agreement']['max_rel']:.1e} vs the reference)")
        elif tp:
            lines.append(f"{t} at batch {tp['batch']}: {tp['skipped']}")
    lats = {t: r["latency"]["p50_ms"] for t, r in report["targets"].items()}
    if len(lats) > 1:
        base = "ort" if "ort" in lats else next(iter(lats))
        lines.append("p50 vs " + base + ": " + ", ".join(f"{t} {v / lats[base]:.2f}x" for t, v in lats.items()
                                                          if t != base))
    return lines


def render_build(report: dict[str, Any]) -> str:
    headers, rows = build_rows(report)
    return "\n".join([*_summary_lines(report), "", table(headers, rows)])


def render_build_markdown(report: dict[str, Any]) -> str:
    headers, rows = build_rows(report)
    env = report["environment"]
    return "\n".join([
        f"# edgec build: {report['model']} on {report['profile']}", "",
        *[f"- {line}" for line in _summary_lines(report)],
        f"- CPU: {env['cpu']}; versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- date: {env['date']}", "", markdown_table(headers, rows), "",
    ])


def write_build_reports(report: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    j, m = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_atomic(j, json.dumps(report, indent=2, default=str))
    write_atomic(m, render_build_markdown(report))
    return j, m


def render_bench(res: dict[str, Any]) -> str:
    """``edgec bench`` for a terminal."""
    lat, ag = res["latency"], res["agreement"]
    lo, hi = lat["ci"]["p50_ms"]
    emulated = "emulated, not a device time: " if res.get("emulated") else ""
    s = (f"{res['target']} on {res['profile']} ({res.get('device', 'local')}): {emulated}p50 "
         f"{lat['p50_ms'] * 1000:.1f} us [95% CI {lo * 1000:.1f}-{hi * 1000:.1f}]  p90 {lat['p90_ms'] * 1000:.1f} us  "
         f"p99 {lat['p99_ms'] * 1000:.1f} us  ({lat['runs']} runs, {lat['threads']} thread, "
         f"{'stable' if lat.get('stable') else 'UNSTABLE'})\n"
         f"vs ONNX Runtime reference: max rel err {ag['max_rel']:.1e}, argmax agreement {ag['argmax_agreement']:.2%}")
    if "accuracy" in res:
        a = res["accuracy"]
        s += (f"\naccuracy on {a['dataset']} ({a['samples']}): {a['task_accuracy']:.2%} "
              f"(reference {a['reference_accuracy']:.2%})")
    if "memory" in res:
        s += (f"\nsize on disk {res['size_bytes'] / 1024:.0f} KiB, runner memory "
              f"+{res['memory']['runner_rss_delta_mb']:.1f} MB (peak RSS {res['memory']['rss_peak_mb']:.0f} MB)")
    return s


def render_inspect(info: dict[str, Any]) -> str:
    """``edgec inspect`` for a terminal: an ONNX file's coverage, or an artifact's manifest and kernels."""
    if "file" in info:
        lines = [f"{info['file']}: {info['params']:,} params, inputs {info['inputs']}",
                 "ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items())]
        for t, c in info["coverage"].items():
            lines.append(f"{t}: " + (c.get("unavailable") or ("all ops supported" if c["complete"]
                                     else f"cannot take {', '.join(c['unsupported'])}")))
        return "\n".join(lines)
    m = info["manifest"]
    lines = [f"artifact {info['artifact']} ({info['kind']}) step {m['step']} profile {m.get('profile')}",
             f"payload {info['dir']}/{m['payload']}  verified: {info['verified']}"]
    if info.get("kernels"):
        def share(k: dict[str, Any]) -> str:
            return f"{k['time_share']:.1%} ({k['us_per_run']} us)" if "time_share" in k else ""

        lines += ["", table(["kernel", "origin", "detail", "time share"],
                            [[k["name"], k["origin"], k.get("kernel", ""), share(k)] for k in info["kernels"]])]
    return "\n".join(lines)


def _fastest_rows(found: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = ["variant", "p50", "p50 95% CI", "accuracy", "drop (pt)", "size", "status", "why"]
    rows = []
    for r in found["variants"]:
        measured = "p50_ms" in r
        rows.append([
            r["label"], _us(r["p50_ms"]) if measured else "-",
            f"{_us(r['ci_p50_ms'][0])} - {_us(r['ci_p50_ms'][1])}" if measured else "-",
            f"{r['accuracy'] * 100:.2f}%" if r.get("accuracy") is not None else "-",
            f"{r['drop_points']:.2f}" if r.get("drop_points") is not None else "-",
            f"{r['size_bytes'] / 1024:.0f} KiB" if measured else "-", r["status"], r.get("reason") or "",
        ])
    return headers, rows


def render_fastest(found: dict[str, Any]) -> str:
    """``edgec build --optimize fastest`` for a terminal."""
    headers, rows = _fastest_rows(found)
    head = (f"model {found['model']}  profile {found['profile']}  on {found['device']}  max drop "
            f"{found['max_drop_points']:g} pt  wall {found['wall_s']} s")
    choice = (f"chosen: {found['chosen']} (artifact {found['artifact']})" if found["chosen"]
              else "no variant stays within the accuracy bound; raise --max-drop or check the failed rows")
    return "\n".join([head, choice, "", table(headers, [[str(c)[:70] for c in r] for r in rows])])


def write_fastest_reports(found: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    headers, rows = _fastest_rows(found)
    j, m = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_atomic(j, json.dumps(found, indent=2, default=str))
    write_atomic(m, "\n".join([f"# edgec build --optimize fastest: {found['model']} on {found['profile']}", "",
                                f"- chosen: {found['chosen'] or 'none within bound'}",
                                f"- max drop {found['max_drop_points']:g} pt; measured on {found['device']}", "",
                                markdown_table(headers, rows), ""]))
    return j, m
