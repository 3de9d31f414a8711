"""Human-readable tables and markdown / JSON reports, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temp file in dst's folder: a reader never sees half a file."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _us(ms: float) -> str:
    return f"{ms * 1000:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def build_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = ["target", "p50", "p90", "p99", "runs", "max rel err", "argmax agree", "accuracy", "ref acc",
               "size", "kernels", "cached"]
    rows = []
    for t, r in report["targets"].items():
        lat, ag, acc = r["latency"], r["agreement"], r.get("accuracy")
        kernels = r.get("kernels") or []
        origins: dict[str, int] = {}
        for k in kernels:
            origins[k["origin"]] = origins.get(k["origin"], 0) + 1
        rows.append([
            t, _us(lat["p50_ms"]), _us(lat["p90_ms"]), _us(lat["p99_ms"]), lat["runs"],
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
    if "tvm_vs_ort_p50_ratio" in report:
        lines.append(f"TVM / ORT p50 ratio: {report['tvm_vs_ort_p50_ratio']:.2f}x")
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
