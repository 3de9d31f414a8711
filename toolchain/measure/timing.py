"""The one timing path: every latency edgec reports (build, bench, pick, ci, the passes' speed checks, the
benchmark scripts) is measured here.

A measurement is ``rounds`` rounds; in each, every candidate gets a freshly loaded runner, is warmed up until
its per-window median stops changing, then timed with ``perf_counter_ns`` around each ``infer`` call
(batch 1). Candidates take turns within a round (their order rotates), so machine noise hits all alike.
Statistics are a two-level bootstrap over rounds and time blocks (``measure.stats``); a candidate whose p50
interval is too wide is measured once more.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from toolchain.measure.stats import StatsConfig, summarize, thin


class Inferable(Protocol):
    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


# A factory of loaded runners: each call loads the artifact afresh (a context manager that closes it).
RunnerFactory = Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True)
class MeasureConfig:
    """Steady-state warm-up, time-based measurement in rounds, and when to re-run."""

    duration_s: float = 1.0
    min_runs: int = 50
    max_runs: int = 200_000
    warmup_window_s: float = 0.05  # one warm-up window; its median is compared with the previous ones
    warmup_tol: float = 0.05  # steady: the last 3 window medians are within 5 % and not falling
    warmup_max_s: float = 3.0  # cap: report steady=False rather than warm up forever
    threads: int = 1
    rounds: int = 6  # fresh runner per round: load-to-load variation belongs in the interval
    round_gap_s: float = 0.25  # idle between rounds, so the rounds sample the machine over a longer span
    rerun_unstable: bool = True
    keep_samples: int = 4000  # thinned samples kept in the result (for regression tests)

    @staticmethod
    def from_profile(bench: Any, duration_s: float | None = None) -> MeasureConfig:
        """From a profile's ``[bench]`` section (a ``core.profile.BenchSpec``)."""
        return MeasureConfig(duration_s=duration_s or bench.duration_s, min_runs=bench.min_runs,
                             warmup_max_s=max(3.0, 5 * bench.warmup_s), threads=bench.threads)


@dataclass(frozen=True)
class Latency:
    """One candidate's latency: percentiles with confidence intervals, how it was measured, whether it is
    stable. ``to_json`` is the schema every report uses."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    runs: int
    ci: dict[str, list[float]]
    confidence: float
    ci_method: str
    ci_rel_width: float
    stable: bool
    stable_threshold: float
    outliers: dict[str, Any]
    warmup_runs: int
    threads: int
    rounds: int
    warmup: dict[str, Any]
    rerun: dict[str, Any] | None = None
    samples_ms: list[float] = field(default_factory=list, repr=False)  # thinned, in time order

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples_ms")
        return d

    @staticmethod
    def from_json(d: dict[str, Any], samples_ms: list[float] | None = None) -> Latency:
        return Latency(**{k: v for k, v in d.items() if k in Latency.__dataclass_fields__},
                       samples_ms=list(samples_ms or []))


def time_runs(runner: Inferable, feed: dict[str, np.ndarray], duration_s: float, min_runs: int,
              max_runs: int = 1_000_000) -> np.ndarray:
    """Samples in ms of back-to-back ``infer`` calls for ``duration_s`` (at least ``min_runs``)."""
    samples: list[float] = []
    t_end = time.perf_counter() + duration_s
    while (time.perf_counter() < t_end or len(samples) < min_runs) and len(samples) < max_runs:
        t0 = time.perf_counter_ns()
        runner.infer(feed)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return np.asarray(samples)


def warmup_until_steady(runner: Inferable, feed: dict[str, np.ndarray], cfg: MeasureConfig) -> dict[str, Any]:
    """Run windows of calls until the per-window median stops changing (or the cap is hit)."""
    medians: list[float] = []
    runs = 0
    t0 = time.perf_counter()
    steady = False
    while True:
        w = time_runs(runner, feed, cfg.warmup_window_s, 5)
        runs += len(w)
        medians.append(float(np.median(w)))
        if len(medians) >= 3:
            last = medians[-3:]
            spread = (max(last) - min(last)) / min(last)
            falling = last[-1] < last[0] * (1 - cfg.warmup_tol)
            if spread < cfg.warmup_tol and not falling:
                steady = True
                break
        if time.perf_counter() - t0 > cfg.warmup_max_s:
            break
    return {"runs": runs, "seconds": round(time.perf_counter() - t0, 4), "windows": len(medians),
            "steady": steady, "window_medians_ms": [round(m, 6) for m in medians[-6:]]}


class MemoryProbe:
    """Resident memory of this (runner) process: before loading, then the highest value seen at each
    ``sample()`` call; ``ru_maxrss`` is the kernel's high-water mark of the whole process."""

    def __init__(self) -> None:
        self.before = self._rss()
        self.peak = self.before

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        except OSError:  # not Linux: the high-water mark is the best there is
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def sample(self) -> None:
        self.peak = max(self.peak, self._rss())

    def to_json(self) -> dict[str, Any]:
        self.sample()
        mb = 1024 * 1024
        return {"rss_before_mb": round(self.before / mb, 2), "rss_peak_mb": round(self.peak / mb, 2),
                "runner_rss_delta_mb": round((self.peak - self.before) / mb, 2),
                "process_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 2)}


@dataclass
class Rounds:
    """Raw timing of one candidate: the samples of each round and each round's warm-up record. A device returns
    these; the statistics (``latency_of_rounds``) are computed where scipy is, on the client."""

    parts: list[np.ndarray] = field(default_factory=list)
    warms: list[dict[str, Any]] = field(default_factory=list)


def measure_rounds(candidates: dict[str, tuple[RunnerFactory, dict[str, np.ndarray]]], cfg: MeasureConfig,
                    memory: MemoryProbe | None) -> dict[str, Rounds]:
    names = list(candidates)
    got = {n: Rounds() for n in names}
    per_round = cfg.duration_s / max(1, cfg.rounds)
    min_per_round = max(1, cfg.min_runs // max(1, cfg.rounds))
    for i in range(max(1, cfg.rounds)):
        if i and cfg.round_gap_s > 0:
            time.sleep(cfg.round_gap_s)
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate who goes first
            make_runner, feed = candidates[name]
            with make_runner() as runner:
                if memory is not None:
                    memory.sample()
                got[name].warms.append(warmup_until_steady(runner, feed, cfg))
                got[name].parts.append(time_runs(runner, feed, per_round, min_per_round, cfg.max_runs))
                if memory is not None:
                    memory.sample()
    return got


def latency_of_rounds(r: Rounds, cfg: MeasureConfig, scfg: StatsConfig) -> Latency:
    samples = np.concatenate(r.parts)
    s = summarize(samples, scfg, [p.size for p in r.parts])
    return Latency(**s, warmup_runs=sum(w["runs"] for w in r.warms), threads=cfg.threads, rounds=len(r.parts),
                   warmup={"steady": all(w["steady"] for w in r.warms), "per_round": r.warms},
                   samples_ms=[round(float(v), 6) for v in thin(samples, cfg.keep_samples)])


def measure_interleaved(candidates: dict[str, tuple[RunnerFactory, dict[str, np.ndarray]]], cfg: MeasureConfig,
                        scfg: StatsConfig | None = None, memory: MemoryProbe | None = None) -> dict[str, Latency]:
    """Latency of every candidate (a runner factory and its feed), measured in interleaved rounds. A
    candidate whose p50 interval is too wide (noisy machine) is measured once more and the second kept."""
    scfg = scfg or StatsConfig()
    first = {n: latency_of_rounds(r, cfg, scfg) for n, r in measure_rounds(candidates, cfg, memory).items()}
    unstable = [n for n, lat in first.items() if not lat.stable] if cfg.rerun_unstable else []
    out = dict(first)
    if unstable:
        again = measure_rounds({n: candidates[n] for n in unstable}, cfg, memory)
        for n in unstable:
            lat = latency_of_rounds(again[n], cfg, scfg)
            rerun = {"reason": "unstable", "first_ci_rel_width": first[n].ci_rel_width,
                     "first_p50_ms": first[n].p50_ms}
            out[n] = Latency(**{**lat.__dict__, "rerun": rerun})
    return out


def measure(make_runner: RunnerFactory, feed: dict[str, np.ndarray], cfg: MeasureConfig,
            scfg: StatsConfig | None = None, memory: MemoryProbe | None = None) -> Latency:
    """Latency of one runner factory (``measure_interleaved`` with one candidate)."""
    return measure_interleaved({"candidate": (make_runner, feed)}, cfg, scfg, memory)["candidate"]


def run_batched(runner: Inferable, input_name: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Run ``x`` one sample at a time (the artifact is compiled for batch 1); stack the first output."""
    outs = [runner.infer({input_name: x[i : i + 1].reshape(shape)})[0] for i in range(len(x))]
    return np.concatenate([np.asarray(o).reshape(1, -1) for o in outs])


def bench_loaded(make_runner: RunnerFactory, input_name: str, shape: tuple[int, ...], x: np.ndarray,
                 cfg: MeasureConfig, memory: MemoryProbe) -> dict[str, Any]:
    """Everything measured on the runner's side, locally or on a device: latency, the outputs of every
    evaluation input (for accuracy and agreement), and the runner's memory. Plain JSON-able data plus the
    outputs array, so a device can send it back as is."""
    feed = {input_name: x[:1].reshape(shape)}
    lat = measure(make_runner, feed, cfg, memory=memory)
    with make_runner() as runner:
        outputs = run_batched(runner, input_name, x, shape)
        memory.sample()
    return {"latency": lat.to_json(), "samples_ms": lat.samples_ms, "outputs": outputs, "memory": memory.to_json()}
