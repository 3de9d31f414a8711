"""build --optimize fastest: every target x pass chain measured together, the fastest within the bound chosen."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.device_models import fit_linear, save
from toolchain import api
from toolchain.core.cache import Cache
from toolchain.core.errors import UsageError
from toolchain.core.profile import load_profile
from toolchain.core.versions import cpu_flags
from toolchain.search import judge, skipped_here, variants_for


def test_variants_cover_every_target_and_precision_the_profile_has() -> None:
    labels = {v.label for v in variants_for(load_profile("x86-avx512"))}
    assert {"ort [cleanup]", "ort [cleanup+int8]", "tvm [cleanup]", "tvm [cleanup+int8=mode=static]",
            "tvm [cleanup+bf16]"} <= labels
    assert "ort [cleanup+bf16]" not in labels  # ONNX Runtime's CPU provider does not compute bf16
    # bf16 weights with fp32 arithmetic run on any CPU; bf16 arithmetic only where this CPU has avx512_bf16
    assert "tvm [cleanup+bf16]" in {v.label for v in variants_for(load_profile("x86-avx2"), runs_here=True)}
    assert (skipped_here(("cleanup", "bf16=form=compute")) is None) == ("avx512_bf16" in cpu_flags())


def test_judge_bounds_the_drop_in_points_or_the_agreement_without_labels() -> None:
    res = {"accuracy": {"task_accuracy": 0.80, "reference_accuracy": 0.812}, "agreement": {"argmax_agreement": 0.9}}
    assert judge(res, 1.0)[:2] == (pytest.approx(1.2), False)
    assert judge(res, 1.5)[1]
    assert not judge({"agreement": {"argmax_agreement": 0.98}}, 1.0)[1]
    assert judge({"agreement": {"argmax_agreement": 0.995}}, 1.0)[1]


def test_fastest_measures_every_variant_and_keeps_the_fastest_within_bound(tmp_path: Path, fashion: object) -> None:
    model = save(fit_linear(fashion, hidden=256), tmp_path / "lin.onnx")
    found = api.fastest(str(model), profile="x86-avx512", cache=Cache(tmp_path / "c"), max_drop=1.0,
                        data="fashion-mnist", samples=500, duration_s=0.2, progress=False)
    rows = {r["label"]: r for r in found["variants"]}
    assert {"ort [cleanup]", "tvm [cleanup]", "ort [cleanup+int8]", "tvm [cleanup+int8]"} <= set(rows)
    assert rows["tvm [cleanup+modular]"]["status"] == "skipped"  # a dense model: the pass changes nothing
    for r in rows.values():  # nothing is dropped silently: every variant has a status and, if not measured, why
        assert r["status"] in ("chosen", "slower", "slower (intervals overlap)", "out of bound", "skipped", "failed")
        assert "p50_ms" in r or r["reason"]
    measured = [r for r in rows.values() if "p50_ms" in r]
    assert len(measured) >= 4
    within = [r for r in measured if r["within_bound"]]
    chosen = rows[found["chosen"]]
    assert chosen["status"] == "chosen" and chosen["p50_ms"] == min(r["p50_ms"] for r in within)
    assert chosen["drop_points"] <= 1.0 and found["artifact"] == chosen["artifact"]


def test_fastest_refuses_to_time_a_device_it_cannot_reach(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot measure it"):
        api.fastest("mlp-small", profile="rpi5", cache=Cache(tmp_path / "c"), progress=False)
    with pytest.raises(UsageError, match="max-drop"):
        api.fastest("mlp-small", profile="x86-avx512", cache=Cache(tmp_path / "c"), max_drop=float("nan"),
                    progress=False)
