"""Latency statistics that say how much they can be trusted.

Timing samples on a shared machine are not independent: the machine drifts (other processes,
frequency, caches) over seconds, so an i.i.d. bootstrap gives confidence intervals that are far too
narrow. We split the time-ordered samples into contiguous blocks and bootstrap whole blocks (a
block bootstrap), so the interval includes the drift seen during the run. Everything is seeded and
vectorised with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from toolchain.core.errors import UsageError

QUANTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0}


@dataclass(frozen=True)
class StatsConfig:
    """How intervals are computed and when a measurement counts as stable."""

    n_boot: int = 1000
    confidence: float = 0.95
    blocks: int = 20  # contiguous time blocks resampled as units
    per_block: int = 200  # samples kept per block for the bootstrap (thinned, seeded)
    stable_rel_width: float = 0.10  # p50 CI width / p50 below this: stable
    outlier_iqr: float = 3.0  # outlier: above Q3 + k * IQR (or below Q1 - k * IQR)
    seed: int = 0


def _blocks(samples: np.ndarray, k: int, m_cap: int) -> np.ndarray:
    """(k, m) matrix: k contiguous time blocks, each reduced to m evenly spaced quantiles of itself (a
    deterministic sketch of the block's distribution, so pooled quantiles match the full data's)."""
    parts = np.array_split(samples, k)
    m = min(min(p.size for p in parts), m_cap)
    grid = (np.arange(m) + 0.5) / m * 100
    return np.stack([np.percentile(p, grid) if p.size > m else p[:m] for p in parts])


def bootstrap_ci(samples: np.ndarray, qs: list[float], cfg: StatsConfig = StatsConfig(),
                 rounds: list[int] | None = None) -> np.ndarray:
    """Confidence intervals of the percentiles ``qs`` (0-100): array (len(qs), 2).

    Without ``rounds``: a block bootstrap over contiguous time blocks. With ``rounds`` (the sizes of
    consecutive measurement rounds, each with a freshly loaded runner): a two-level bootstrap that
    resamples rounds, then blocks within each chosen round, so load-to-load variation is included."""
    s = np.asarray(samples, dtype=np.float64)
    if s.size < 2:
        return np.repeat(s[:1], 2 * len(qs)).reshape(len(qs), 2) if s.size else np.zeros((len(qs), 2))
    rng = np.random.default_rng(cfg.seed)
    groups = np.split(s, np.cumsum(rounds)[:-1]) if rounds and len(rounds) >= 2 else [s]
    nmin = min(g.size for g in groups)
    k = int(max(2, min(cfg.blocks, nmin // 10))) if nmin >= 20 else max(1, nmin)
    m_cap = max(1, cfg.per_block * cfg.blocks // (k * len(groups)))
    sketches = [_blocks(g, k, m_cap) for g in groups]
    m = min(x.shape[1] for x in sketches)
    data = np.stack([x[:, :m] for x in sketches])  # (rounds, k, m)
    r = data.shape[0]
    est = np.empty((len(qs), cfg.n_boot))
    chunk = max(1, 2_000_000 // (r * k * m))  # bound memory: at most ~16 MB per chunk
    for start in range(0, cfg.n_boot, chunk):
        b = min(chunk, cfg.n_boot - start)
        ri = rng.integers(0, r, size=(b, r)) if r > 1 else np.zeros((b, 1), dtype=np.int64)
        ki = rng.integers(0, k, size=(b, r, k))
        est[:, start : start + b] = np.percentile(data[ri[:, :, None], ki].reshape(b, r * k * m), qs, axis=1)
    alpha = (1.0 - cfg.confidence) / 2
    ci = np.percentile(est, [100 * alpha, 100 * (1 - alpha)], axis=1).T
    if len(groups) >= 3:
        ci = _widen_for_few_rounds(ci, s, groups, qs, cfg.confidence)
    return ci


def _widen_for_few_rounds(ci: np.ndarray, s: np.ndarray, groups: list[np.ndarray], qs: list[float],
                          confidence: float) -> np.ndarray:
    """A bootstrap over a handful of rounds under-covers (it cannot see more spread than the rounds
    show, and its variance is biased low by (R-1)/R). Take the hull with the Student-t interval on the
    per-round percentiles, the standard small-cluster correction."""
    from scipy.stats import t as student_t

    r = len(groups)
    per_round = np.stack([np.percentile(g, qs) for g in groups])  # (R, len(qs))
    half = student_t.ppf(0.5 + confidence / 2, r - 1) * per_round.std(axis=0, ddof=1) / np.sqrt(r)
    point = np.percentile(s, qs)
    return np.stack([np.minimum(ci[:, 0], point - half), np.maximum(ci[:, 1], point + half)], axis=1)


def outliers(samples: np.ndarray, k: float = 3.0) -> dict[str, Any]:
    q1, q3 = np.percentile(samples, [25, 75])
    iqr = q3 - q1
    hi, lo = q3 + k * iqr, q1 - k * iqr
    return {"high": int((samples > hi).sum()), "low": int((samples < lo).sum()), "rule": f"Q3 + {k:g} IQR",
            "threshold_ms": round(float(hi), 6)}


def summarize(samples_ms: np.ndarray, cfg: StatsConfig = StatsConfig(),
              rounds: list[int] | None = None) -> dict[str, Any]:
    """p50/p90/p99 with CIs, min/max/mean, outlier counts, relative p50 CI width and the stable flag."""
    s = np.asarray(samples_ms, dtype=np.float64)
    if s.size == 0:
        raise UsageError("no latency samples were taken; increase the bench duration")
    names = list(QUANTILES)
    qs = [QUANTILES[n] for n in names]
    point = np.percentile(s, qs)
    ci = bootstrap_ci(s, qs, cfg, rounds)
    p50 = float(point[0])
    rel = float((ci[0, 1] - ci[0, 0]) / p50) if p50 > 0 else float("inf")
    out: dict[str, Any] = {f"{n}_ms": float(v) for n, v in zip(names, point, strict=True)}
    out.update({
        "min_ms": float(s.min()), "max_ms": float(s.max()), "mean_ms": float(s.mean()), "runs": int(s.size),
        "ci": {f"{n}_ms": [float(lo), float(hi)] for n, (lo, hi) in zip(names, ci, strict=True)},
        "confidence": cfg.confidence,
        "ci_method": (f"two-level bootstrap over {len(rounds)} rounds x time blocks, hull with Student-t on "
                      "per-round percentiles" if rounds and len(rounds) > 1
                      else "block bootstrap over time blocks") + f" ({cfg.n_boot} resamples, seed {cfg.seed})",
        "ci_rel_width": rel, "stable": bool(rel < cfg.stable_rel_width),
        "stable_threshold": cfg.stable_rel_width, "outliers": outliers(s, cfg.outlier_iqr),
    })
    return out


def thin(samples: np.ndarray, max_n: int, seed: int = 0) -> np.ndarray:
    """At most ``max_n`` samples, chosen at random (seeded) but kept in time order."""
    if samples.size <= max_n:
        return samples
    idx = np.sort(np.random.default_rng(seed).choice(samples.size, size=max_n, replace=False))
    return samples[idx]


def ci_overlap(a: list[float], b: list[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


# ------------------------------------------------------------------ comparability

# Result fields that must match for two measurements to be compared as like with like.
_SAME = ("profile", "target", "threads")
_VERSION_KEYS = ("edgec", "onnxruntime", "apache-tvm", "tensorrt", "numpy")


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Why two bench results are not comparable (empty list: comparable)."""
    out = [f"{f}: {a.get(f)!r} vs {b.get(f)!r}" for f in _SAME if a.get(f) != b.get(f)]
    va = (a.get("environment") or {}).get("versions", {})
    vb = (b.get("environment") or {}).get("versions", {})
    out += [f"{k} version: {va.get(k)} vs {vb.get(k)}" for k in _VERSION_KEYS if va.get(k) != vb.get(k)]
    ca, cb = (a.get("environment") or {}).get("cpu"), (b.get("environment") or {}).get("cpu")
    if ca != cb:
        out.append(f"cpu: {ca!r} vs {cb!r}")
    return out


def require_comparable(a: dict[str, Any], b: dict[str, Any], allow: bool = False) -> list[str]:
    """Raise when two results differ in profile, target, threads, versions or CPU, unless ``allow``
    (then the differences are returned so the caller can print them next to the comparison)."""
    diff = differences(a, b)
    if diff and not allow:
        raise UsageError("refusing to compare results measured differently (" + "; ".join(diff)
                         + "); re-measure both with the same setup, or allow the mismatch explicitly")
    return diff
