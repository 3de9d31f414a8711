"""Benchmark core: latency statistics, agreement with a reference, task accuracy.

Latency: warm-up for a fixed time, then time-based measurement (at least ``min_runs`` runs) with
``perf_counter_ns`` around each ``infer`` call, batch 1.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from toolchain.export import Parity, compare


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    runs: int
    warmup_runs: int
    threads: int

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def latency_stats(samples_ms: np.ndarray, warmup_runs: int, threads: int) -> LatencyStats:
    s = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    return LatencyStats(float(p50), float(p90), float(p99), float(s.min()), float(s.max()), float(s.mean()),
                        int(s.size), warmup_runs, threads)


def time_runs(runner: Any, feed: dict[str, np.ndarray], warmup_s: float, duration_s: float,
              min_runs: int, max_runs: int = 1_000_000) -> tuple[np.ndarray, int]:
    """(samples in ms, warm-up run count)."""
    warm = 0
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end or warm < 3:
        runner.infer(feed)
        warm += 1
    samples = []
    t_end = time.perf_counter() + duration_s
    while (time.perf_counter() < t_end or len(samples) < min_runs) and len(samples) < max_runs:
        t0 = time.perf_counter_ns()
        runner.infer(feed)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return np.asarray(samples), warm


def measure_latency(runner: Any, feed: dict[str, np.ndarray], warmup_s: float = 0.2,
                    duration_s: float = 1.0, min_runs: int = 50, threads: int = 1) -> LatencyStats:
    samples, warm = time_runs(runner, feed, warmup_s, duration_s, min_runs)
    return latency_stats(samples, warm, threads)


def run_batched(runner: Any, input_name: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Run ``x`` one sample at a time (the artifact is compiled for batch 1); stack the first output."""
    outs = []
    for i in range(len(x)):
        outs.append(runner.infer({input_name: x[i : i + 1].reshape(shape)})[0])
    return np.concatenate([o.reshape(1, -1) for o in outs])


def agreement(runner: Any, reference: Any, input_name: str, x: np.ndarray, shape: tuple[int, ...]) -> Parity:
    """Candidate runner vs a reference runner on the same inputs."""
    got = run_batched(runner, input_name, x, shape)
    ref = run_batched(reference, input_name, x, shape)
    return compare([ref], [got])


def task_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels[: len(logits)]).mean())


def measure_interleaved(runs: dict[str, tuple[Any, dict[str, np.ndarray]]], warmup_s: float = 0.2,
                        duration_s: float = 1.0, min_runs: int = 50, rounds: int = 5,
                        threads: int = 1) -> dict[str, LatencyStats]:
    """Latency of several runners measured in alternating rounds, so machine noise hits all alike."""
    samples: dict[str, list[np.ndarray]] = {k: [] for k in runs}
    warm: dict[str, int] = {}
    for name, (runner, feed) in runs.items():
        _, warm[name] = time_runs(runner, feed, warmup_s, 0.0, 0)
    per_round = duration_s / rounds
    for _ in range(rounds):
        for name, (runner, feed) in runs.items():
            s, _ = time_runs(runner, feed, 0.0, per_round, max(1, min_runs // rounds))
            samples[name].append(s)
    return {k: latency_stats(np.concatenate(v), warm[k], threads) for k, v in samples.items()}
