"""Honest measurement: bootstrap intervals, outliers, stability, warm-up, comparability, memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from targets.ort import OrtRunner
from tests.fixtures.device_models import fit_linear, random_mlp, save
from toolchain.core.errors import UsageError
from toolchain.measure.stats import StatsConfig, bootstrap_ci, require_comparable, summarize
from toolchain.measure.timing import MeasureConfig, measure, warmup_until_steady


def test_bootstrap_ci_covers_the_true_median_about_95_percent() -> None:
    rng = np.random.default_rng(123)
    true_median = np.exp(0.0)  # lognormal(0, 0.5)
    cfg = StatsConfig(n_boot=300)
    hits = 0
    for i in range(100):
        ci = bootstrap_ci(rng.lognormal(0, 0.5, 400), [50.0], StatsConfig(n_boot=300, seed=i))[0]
        hits += ci[0] <= true_median <= ci[1]
    assert 85 <= hits <= 100, hits
    assert cfg.confidence == 0.95


def test_block_bootstrap_sees_drift_that_iid_resampling_hides() -> None:
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, 1.3, 4000) + rng.normal(0, 0.01, 4000)  # the machine slowly got slower
    shuffled = rng.permutation(drift)
    w_drift = np.diff(bootstrap_ci(drift, [50.0])[0])[0]
    w_shuf = np.diff(bootstrap_ci(shuffled, [50.0])[0])[0]
    assert w_drift > 3 * w_shuf


def test_summary_counts_outliers_and_flags_instability() -> None:
    rng = np.random.default_rng(1)
    s = np.concatenate([rng.normal(1.0, 0.01, 5000), [50.0] * 7])
    out = summarize(s)
    assert out["outliers"]["high"] == 7 and out["stable"]
    lo, hi = out["ci"]["p50_ms"]
    assert lo <= out["p50_ms"] <= hi and out["ci"]["p99_ms"][1] >= out["ci"]["p90_ms"][0]
    noisy = summarize(rng.lognormal(0, 1.5, 30))
    assert not noisy["stable"] and noisy["ci_rel_width"] > 0.10


def test_results_of_different_profiles_or_versions_are_never_compared_silently() -> None:
    a = {"profile": "x86-avx512", "target": "ort", "threads": 1,
         "environment": {"versions": {"edgec": "0.1.0", "onnxruntime": "1.32.0"}, "cpu": "AMD EPYC"}}
    require_comparable(a, dict(a))
    b = {**a, "profile": "x86-avx2"}
    with pytest.raises(UsageError, match="profile"):
        require_comparable(a, b)
    c = {**a, "environment": {"versions": {"edgec": "0.1.0", "onnxruntime": "1.20.0"}, "cpu": "AMD EPYC"}}
    assert require_comparable(a, c, allow=True) == ["onnxruntime version: 1.32.0 vs 1.20.0"]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory, fashion: object) -> OrtRunner:
    p = save(fit_linear(fashion), tmp_path_factory.mktemp("stats") / "lin.onnx")
    return OrtRunner(Path(p), 1)


def test_measure_warms_up_until_steady_and_reruns_when_unstable(runner: OrtRunner) -> None:
    feed = {"x": np.zeros((1, 784), np.float32)}
    cfg = MeasureConfig(duration_s=0.15, min_runs=50)
    warm = warmup_until_steady(runner, feed, cfg)
    assert warm["windows"] >= 3 and warm["runs"] > 15
    res = measure(lambda: runner, feed, cfg)
    assert res.runs >= 50 or not res.stable
    # A noisy first pass (this machine is shared) is re-run once, and the re-run says why: stable or not after it.
    assert res.rerun is None or res.rerun["reason"] == "unstable"
    # An impossible stability threshold forces the one automatic re-run, which is recorded.
    forced = measure(lambda: runner, feed, cfg, StatsConfig(stable_rel_width=0.0))
    assert res.rounds == cfg.rounds
    assert forced.rerun is not None and forced.rerun["reason"] == "unstable"
    assert 0 < len(forced.samples_ms) <= cfg.keep_samples


def test_memory_probe_sees_the_runner_allocate(tmp_path: Path) -> None:
    """In a fresh process (as on a device), so memory freed by earlier tests cannot hide the growth."""
    import json
    import subprocess
    import sys

    p = save(random_mlp((784, 4096, 2048, 10)), tmp_path / "big.onnx")  # 46 MB of fp32 weights
    code = ("import json, numpy as np\nfrom toolchain.measure.timing import MemoryProbe\n"
            "from targets.ort import OrtRunner\n"
            "mem = MemoryProbe()\n"
            f"with OrtRunner({str(p)!r}, 1) as r:\n"
            "    r.infer({'x': np.zeros((1, 784), np.float32)})\n    mem.sample()\nprint(json.dumps(mem.to_json()))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    timeout=120).stdout.strip().splitlines()[-1])
    assert out["runner_rss_delta_mb"] > 40 and out["process_maxrss_mb"] >= out["rss_peak_mb"] * 0.9
