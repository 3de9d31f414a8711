"""edgec pick: the decision rule on measured rows, and a real pick over a small candidates file."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cli import app
from tests.fixtures.device_models import fit_linear, save
from toolchain.pick import decide, pareto


def row(label: str, lat: float, hi: float, acc: float | None) -> dict:
    return {"label": label, "latency_ms": lat, "ci_ms": [lat * 0.9, hi], "accuracy": acc}


def test_decide_needs_the_upper_ci_bound_within_budget() -> None:
    rows = [row("fast", 0.10, 0.11, 0.80), row("edge", 0.18, 0.26, 0.90),  # point in budget, CI not
            row("good", 0.15, 0.19, 0.86), row("ok", 0.12, 0.13, 0.84), row("nolabel", 0.01, 0.01, None)]
    out = decide(rows, budget_ms=0.2, min_accuracy=0.82, metric="p90")
    assert out == {"chosen": "good", "runner_up": "ok"}
    by = {r["label"]: r for r in rows}
    assert by["edge"]["status"] == "rejected" and "upper 95% CI 0.2600 ms > budget 0.2 ms" in by["edge"]["reason"]
    assert by["fast"]["status"] == "rejected" and "accuracy 0.8000 < floor 0.82" in by["fast"]["reason"]
    assert "accuracy 0.8400 vs chosen 0.8600" in by["ok"]["reason"]
    assert by["nolabel"]["status"] == "rejected"
    assert pareto(rows) == ["fast", "ok", "good", "edge"]


def test_decide_without_any_fit() -> None:
    rows = [row("a", 1.0, 1.2, 0.9)]
    assert decide(rows, 0.5, None, "p50") == {"chosen": None, "runner_up": None}


CANDS = """
[defaults]
targets = ["ort"]
passes = [[], ["cleanup"]]
data = "fashion-mnist"

[[candidate]]
model = "{small}"

[[candidate]]
model = "{big}"
passes = [["cleanup"]]
"""


def test_pick_over_a_candidates_file_then_warm_from_cache(tmp_path: Path, fashion: object) -> None:
    small = save(fit_linear(fashion), tmp_path / "small.onnx")
    big = save(fit_linear(fashion, hidden=1024), tmp_path / "big.onnx")  # slower and more accurate
    cands = tmp_path / "cands.toml"
    cands.write_text(CANDS.format(small=small, big=big))
    args = ["--cache-dir", str(tmp_path / "cache"), "pick", "--profile", "x86-avx512", "--budget-ms", "1000",
            "--metric", "p90", "--candidates", str(cands), "--report-dir", str(tmp_path / "rep"),
            "--duration", "0.2", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert len(rep["candidates"]) == 3 and rep["bench_cache_hits"] == 0
    assert rep["chosen"].startswith(str(big))  # generous budget: the most accurate wins
    big_p90 = next(c for c in rep["candidates"] if c["label"] == rep["chosen"])["ci_ms"][1]
    small_hi = max(c["ci_ms"][1] for c in rep["candidates"] if c["model"] == str(small))
    if small_hi < big_p90:  # a budget between them must drop the big model, with the reason
        args[args.index("1000")] = f"{(small_hi + big_p90) / 2:.6f}"
        rep2 = json.loads(CliRunner().invoke(app, args).output)
        assert rep2["chosen"].startswith(str(small)) and rep2["bench_cache_hits"] == 3
        assert "> budget" in next(c for c in rep2["candidates"] if c["model"] == str(big))["reason"]
    assert (tmp_path / "rep" / "pick.png").stat().st_size > 1000
    md = (tmp_path / "rep" / "pick.md").read_text()
    assert "Pareto front" in md and "Runner-up" in md


def test_pick_rejects_bad_metric(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["pick", "--profile", "x86-avx512", "--budget-ms", "1", "--metric", "p42"])
    assert r.exit_code == 2 and "p42" in r.output


def test_zoo_sweep_compares_one_task_only() -> None:
    """Accuracies of different tasks (Cora, a 3-class Fashion-MNIST subset) must not compete."""
    from toolchain.core.errors import UsageError
    from toolchain.core.profile import load_profile
    from toolchain.pick import zoo_candidates
    from toolchain.zoo.registry import entries

    prof = load_profile("x86-avx512")
    names = {c.model for c in zoo_candidates(prof, "fashion-mnist")}
    assert names and all(entries()[n].dataset == "fashion-mnist" for n in names)
    assert "mlp-small" in names and not any(n.startswith(("nnf-tops", "glnn-")) for n in names)
    cora = {c.model for c in zoo_candidates(prof, "cora")}
    assert cora >= {"glnn-cora", "ffg2m-cora"} and not cora & {"gcn-cora", "sage-cora"}  # teachers: not deployed
    import pytest

    with pytest.raises(UsageError, match="--task"):
        zoo_candidates(prof, "imagenet")


def test_zoo_sweep_considers_every_target_and_precision() -> None:
    from toolchain.core.profile import load_profile
    from toolchain.pick import zoo_candidates

    cands = [c for c in zoo_candidates(load_profile("x86-avx512"), "fashion-mnist") if c.model == "mlp-small"]
    assert {c.target for c in cands} == {"ort", "tvm"}
    assert {c.passes for c in cands} >= {("cleanup",), ("cleanup", "int8"), ("cleanup", "bf16")}
    remote = [c for c in zoo_candidates(load_profile("x86-avx512"), "fashion-mnist", runs_here=False)
              if c.model == "mlp-small"]
    assert ("cleanup", "bf16") in {c.passes for c in remote}  # the device has bf16, even where this CPU has not


def test_pick_refuses_a_profile_it_cannot_measure_here(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["--cache-dir", str(tmp_path), "pick", "--profile", "rpi5", "--budget-ms", "1"])
    assert r.exit_code == 2 and "cannot measure it" in r.output
