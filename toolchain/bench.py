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


# ------------------------------------------------------------------ honest measurement (issue 6)


@dataclass(frozen=True)
class MeasureConfig:
    """Steady-state warm-up, time-based measurement, and when to re-run."""

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
        return MeasureConfig(duration_s=duration_s or bench.duration_s, min_runs=bench.min_runs,
                             warmup_max_s=max(3.0, 5 * bench.warmup_s), threads=bench.threads)


def warmup_until_steady(runner: Any, feed: dict[str, np.ndarray], cfg: MeasureConfig) -> dict[str, Any]:
    """Run windows of calls until the per-window median stops changing (or the cap is hit)."""
    medians: list[float] = []
    runs = 0
    t0 = time.perf_counter()
    steady = False
    while True:
        w: list[float] = []
        t_end = time.perf_counter() + cfg.warmup_window_s
        while time.perf_counter() < t_end or len(w) < 5:
            t = time.perf_counter_ns()
            runner.infer(feed)
            w.append((time.perf_counter_ns() - t) / 1e6)
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


def _measure_once(make_runner: Any, feed: dict[str, np.ndarray], cfg: MeasureConfig, scfg: Any,
                  memory: MemoryProbe | None) -> dict[str, Any]:
    """``cfg.rounds`` rounds, each with a freshly loaded runner warmed up until steady, then timed for
    ``duration_s / rounds``; statistics over all rounds (two-level bootstrap)."""
    from toolchain.stats import summarize

    parts, warms = [], []
    for i in range(max(1, cfg.rounds)):
        if i:
            time.sleep(cfg.round_gap_s)
        with make_runner() as runner:
            if memory is not None:
                memory.sample()
            warms.append(warmup_until_steady(runner, feed, cfg))
            s, _ = time_runs(runner, feed, 0.0, cfg.duration_s / max(1, cfg.rounds),
                             max(1, cfg.min_runs // max(1, cfg.rounds)), cfg.max_runs)
            parts.append(s)
            if memory is not None:
                memory.sample()
    samples = np.concatenate(parts)
    lat = summarize(samples, scfg, [p.size for p in parts])
    lat.update({"warmup_runs": sum(w["runs"] for w in warms), "threads": cfg.threads, "rounds": len(parts),
                "warmup": {"steady": all(w["steady"] for w in warms), "per_round": warms}})
    return {"latency": lat, "samples": samples}


def measure_honest(make_runner: Any, feed: dict[str, np.ndarray], cfg: MeasureConfig,
                   scfg: Any = None, memory: MemoryProbe | None = None) -> dict[str, Any]:
    """Warm up until steady, measure for ``cfg.duration_s`` in rounds (a fresh runner from
    ``make_runner()`` each), summarise with bootstrap CIs; when the p50 interval is too wide (noisy
    machine), measure once more and keep the second run.
    Returns {"latency": {...}, "samples_ms": [...thinned, time order...]}."""
    from toolchain.stats import StatsConfig, thin

    scfg = scfg or StatsConfig()
    first = _measure_once(make_runner, feed, cfg, scfg, memory)
    res = first
    if cfg.rerun_unstable and not first["latency"]["stable"]:
        res = _measure_once(make_runner, feed, cfg, scfg, memory)
        res["latency"]["rerun"] = {"reason": "unstable", "first_ci_rel_width": first["latency"]["ci_rel_width"],
                                   "first_p50_ms": first["latency"]["p50_ms"]}
    else:
        res["latency"]["rerun"] = None
    return {"latency": res["latency"], "samples_ms": [round(float(v), 6) for v in thin(res["samples"], cfg.keep_samples)]}


class MemoryProbe:
    """Resident memory of this (runner) process: before loading, then the highest value seen at each
    ``sample()`` call; ``ru_maxrss`` is the kernel's high-water mark of the whole process."""

    def __init__(self) -> None:
        self.before = self._rss()
        self.peak = self.before

    @staticmethod
    def _rss() -> int:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:  # psutil is a dependency, but a bare device may lack it
            return 0

    def sample(self) -> None:
        self.peak = max(self.peak, self._rss())

    def to_json(self) -> dict[str, Any]:
        import resource

        self.sample()
        mb = 1024 * 1024
        return {"rss_before_mb": round(self.before / mb, 2), "rss_peak_mb": round(self.peak / mb, 2),
                "runner_rss_delta_mb": round((self.peak - self.before) / mb, 2),
                "process_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 2)}


def bench_loaded(make_runner: Any, input_name: str, shape: tuple[int, ...], x: np.ndarray, cfg: MeasureConfig,
                 memory: MemoryProbe) -> dict[str, Any]:
    """Everything measured on the runner's side, locally or on a device: latency (honest), the outputs
    of every evaluation input (for accuracy and agreement), and the runner's memory."""
    feed = {input_name: x[:1].reshape(shape)}
    res = measure_honest(make_runner, feed, cfg, memory=memory)
    with make_runner() as runner:
        res["outputs"] = run_batched(runner, input_name, x, shape)
        memory.sample()
    res["memory"] = memory.to_json()
    return res


# ------------------------------------------------------------------ one bench, local or remote


@dataclass(frozen=True)
class BenchJob:
    """Everything needed to benchmark one compiled artifact and judge its outputs."""

    art: Any  # toolchain.cache.Artifact
    target: str
    profile: str
    input_name: str
    shape: tuple[int, ...]
    x: np.ndarray  # evaluation inputs (labelled test set, or seeded random without data)
    ref_out: np.ndarray  # reference (source ONNX on ONNX Runtime) outputs for x
    dataset: Any  # toolchain.zoo.datasets.Dataset | None
    cfg: MeasureConfig


def prepare_job(art: Any, cache: Any, profile: Any = None, data: str | None = None, data_dir: Any = None,
                samples: int = 1000, duration_s: float | None = None, reference: Any = None) -> BenchJob:
    """Resolve the source model, inputs, dataset and the reference outputs (computed here, on the client)."""
    from targets import KIND_TO_TARGET
    from targets.ort import OrtRunner
    from toolchain.api import _dataset_for, _eval_inputs, source_onnx
    from toolchain.errors import UsageError
    from toolchain.onnx_io import fix_batch, input_specs, load_onnx
    from toolchain.profile import load_profile

    if art.kind not in KIND_TO_TARGET:
        raise UsageError(f"artifact {art.key[:12]} is a {art.kind!r}, not a compiled model; run 'edgec compile' first")
    profile = profile or load_profile(art.profile or "x86-avx512")
    src = reference or source_onnx(art, cache)
    spec = input_specs(fix_batch(load_onnx(src.payload, check=False), 1))
    if len(spec) != 1:
        raise UsageError(f"bench takes single-input models for now; {art.key[:12]} has {len(spec)} inputs")
    ds = _dataset_for(src, data_dir, data)
    name, shape = spec[0].name, tuple(spec[0].shape)
    x = _eval_inputs(ds, samples, shape)
    with OrtRunner(src.payload, profile.bench.threads) as ref:
        ref_out = run_batched(ref, name, x, shape)
    return BenchJob(art, KIND_TO_TARGET[art.kind], profile.id, name, shape, x, ref_out, ds,
                    MeasureConfig.from_profile(profile.bench, duration_s))


def run_local(job: BenchJob) -> dict[str, Any]:
    """Run the job's artifact in this process (the local 'device')."""
    from targets import get_target
    from toolchain.api import environment

    mem = MemoryProbe()
    target = get_target(job.target)
    dev = bench_loaded(lambda: target.load(job.art), job.input_name, job.shape, job.x, job.cfg, mem)
    dev["environment"] = environment()
    dev["device"] = "local"
    return dev


def assemble(job: BenchJob, dev: dict[str, Any]) -> dict[str, Any]:
    """The bench result (same schema for local and remote runs) from what the device measured."""
    from toolchain.export import compare

    got = np.asarray(dev["outputs"]).reshape(len(job.x), -1)
    res: dict[str, Any] = {
        "artifact": job.art.key, "kind": job.art.kind, "target": job.target, "profile": job.profile,
        "threads": job.cfg.threads, "device": dev["device"], "latency": dev["latency"],
        "agreement": compare([job.ref_out], [got]).to_json(),
    }
    if job.dataset is not None:
        res["accuracy"] = {"dataset": job.dataset.name, "samples": len(job.x),
                           "task_accuracy": task_accuracy(got, job.dataset.y_test),
                           "reference_accuracy": task_accuracy(job.ref_out, job.dataset.y_test)}
    res["size_bytes"] = job.art.payload.stat().st_size
    res["memory"] = dev["memory"]
    res["environment"] = dev["environment"]
    res["bench_config"] = asdict(job.cfg)
    res["latency_samples_ms"] = dev["samples_ms"]
    return res
