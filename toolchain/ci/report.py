"""Reports of ``edgec ci``: JSON, JUnit XML (one testcase per model and gate) and a markdown summary
(also appended to $GITHUB_STEP_SUMMARY when it is set)."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from toolchain.core.text import markdown_table, write_atomic


def junit(rep: dict[str, Any]) -> str:
    cases = []
    if rep.get("infra_error"):
        cases.append(("infrastructure", "measure", "error", rep["infra_error"]))
    cases += [(name, g["gate"], g["status"], g["message"]) for name, m in rep.get("models", {}).items()
              for g in m["gates"]]
    suite = ET.Element("testsuite", name=f"edgec ci {rep['project']}", tests=str(len(cases)),
                       failures=str(sum(c[2] == "failed" for c in cases)),
                       errors=str(sum(c[2] in ("error", "refused") for c in cases)),
                       skipped=str(sum(c[2] == "skipped" for c in cases)), time=str(rep.get("wall_s", 0)))
    for model, gate, status, msg in cases:
        tc = ET.SubElement(suite, "testcase", classname=f"edgec.{model}", name=gate)
        if status == "failed":
            ET.SubElement(tc, "failure", message=msg, type=gate).text = msg
        elif status == "error":
            ET.SubElement(tc, "error", message=msg, type="InfraError").text = msg
        elif status == "refused":  # an emulated latency: no gate decided on it
            ET.SubElement(tc, "error", message=msg, type="EmulatedLatency").text = msg
        elif status == "skipped":
            ET.SubElement(tc, "skipped", message=msg)
        else:
            ET.SubElement(tc, "system-out").text = msg
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def markdown(rep: dict[str, Any]) -> str:
    lines = [f"## edgec ci: {rep['project']} — {rep.get('status', '?').upper()}", ""]
    if rep.get("infra_error"):
        lines += [f"**Infrastructure error (exit 3, not a model failure):** {rep['infra_error']}", ""]
    rows = []
    for name, m in rep.get("models", {}).items():
        r = m["result"]
        lat = r["latency"]
        metric = m["spec"]["metric"]
        acc = (r.get("accuracy") or {}).get("task_accuracy")
        for g in m["gates"]:
            mark = {"passed": "pass", "failed": "**FAIL**", "skipped": "skip",
                    "refused": "**REFUSED**"}.get(g["status"], g["status"])
            shown = f"{lat[f'{metric}_ms']:.4f}" + (" (emulated, not a device time)" if r.get("emulated") else "")
            rows.append([name, g["gate"], mark, shown, f"{m['spec']['budget_ms']:g}",
                         "-" if acc is None else f"{acc:.4f}", g["message"].replace("|", "/")])
    if rows:
        lines.append(markdown_table(["model", "gate", "result", "latency ms", "budget ms", "accuracy", "detail"], rows))
    if rep.get("baseline_written"):
        lines += ["", f"Baseline written to {rep['baseline_written']}."]
    return "\n".join(lines) + "\n"


def write_reports(proj: Any, rep: dict[str, Any]) -> dict[str, str]:
    out: Path = proj.reports
    paths = {"json": out / "ci.json", "junit": out / "junit.xml", "markdown": out / "summary.md"}
    rep["reports"] = {k: str(v) for k, v in paths.items()}
    write_atomic(paths["json"], json.dumps(rep, indent=2, default=str))
    write_atomic(paths["junit"], junit(rep))
    md = markdown(rep)
    write_atomic(paths["markdown"], md)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(md)
    return rep["reports"]
