"""Parity and agreement must not be NaN-blind: a NaN or Inf in the candidate where the reference is finite is a
failure of its own (``nonfinite``), whatever the shape of the output or the position of the reference's argmax."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from toolchain.measure.compare import compare

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("ref, got", [
    ([[5.0, 1.0, 0.0]], [[NAN, NAN, NAN]]),  # reference argmax 0: argmax of all-NaN is 0 too
    ([[5.0, 1.0, 0.0]], [[5.0, 1.0, NAN]]),  # NaN only where the error would otherwise be 0
    ([[5.0, 1.0, 0.0]], [[5.0, INF, 0.0]]),
    ([1.0, 2.0, 3.0], [1.0, NAN, 3.0]),  # 1-D output: no argmax check at all
    ([[0.5], [0.25]], [[0.5], [-INF]]),  # one column
])
def test_nonfinite_candidate_fails(ref: list, got: list) -> None:
    p = compare([np.array(ref)], [np.array(got)])
    assert not p.ok()
    assert p.nonfinite >= 1
    assert math.isinf(p.max_rel) and math.isinf(p.max_abs)
    assert "NaN or Inf" in p.problem()
    assert json.loads(json.dumps(p.to_json()))["nonfinite"] == p.nonfinite


def test_nonfinite_in_one_of_several_outputs() -> None:
    ref = [np.ones((4, 3)), np.ones((4, 2))]
    got = [np.ones((4, 3)), np.array([[1.0, 1.0]] * 3 + [[NAN, 1.0]])]
    p = compare(ref, got)
    assert not p.ok() and p.nonfinite == 1 and p.argmax_agreement < 1.0


def test_finite_outputs_unchanged() -> None:
    ref = np.array([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    p = compare([ref], [ref + 1e-7])
    assert p.ok() and p.nonfinite == 0 and p.problem() == ""
    assert p.max_abs == pytest.approx(1e-7)


def test_nan_in_both_is_not_a_candidate_fault() -> None:
    """Where the reference itself is NaN there is nothing to judge; the finite rest still is."""
    p = compare([np.array([[NAN, 1.0]])], [np.array([[NAN, 1.0]])])
    assert p.nonfinite == 0 and p.max_rel == 0.0
