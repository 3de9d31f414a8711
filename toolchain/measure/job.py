"""A bench job (one compiled artifact, its inputs and the reference outputs) and how a device's raw
measurement becomes the bench result: the same judging for a local run and a remote device."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from toolchain.core.cache import Artifact
from toolchain.measure.compare import compare, task_accuracy
from toolchain.measure.timing import Inferable, MeasureConfig


@dataclass(frozen=True)
class Labels:
    """The labelled set a job's inputs come from."""

    dataset: str
    y: np.ndarray


@dataclass(frozen=True)
class BenchJob:
    """Everything needed to benchmark one compiled artifact and judge its outputs."""

    art: Artifact
    target: str
    profile: str
    input_name: str
    shape: tuple[int, ...]
    x: np.ndarray  # evaluation inputs (labelled test set, or seeded random without data)
    ref_out: np.ndarray  # reference (source ONNX on ONNX Runtime) outputs for x
    labels: Labels | None
    cfg: MeasureConfig
    # The further inputs of a multi-input model: (name, batch-1 shape, evaluation inputs with x's leading count).
    more_inputs: tuple[tuple[str, tuple[int, ...], np.ndarray], ...] = ()

    def feed(self, i: int) -> dict[str, np.ndarray]:
        """Every input of evaluation sample ``i``, shaped for the batch-1 artifact."""
        feed = {self.input_name: self.x[i : i + 1].reshape(self.shape)}
        for name, shape, arr in self.more_inputs:
            feed[name] = arr[i : i + 1].reshape(shape)
        return feed


def run_job_inputs(runner: Inferable, job: BenchJob) -> np.ndarray:
    """Run every evaluation sample of ``job`` (all its inputs) one at a time; stack the first output."""
    outs = [runner.infer(job.feed(i))[0] for i in range(len(job.x))]
    return np.concatenate([np.asarray(o).reshape(1, -1) for o in outs])


def assemble(job: BenchJob, dev: dict[str, Any]) -> dict[str, Any]:
    """The bench result (same schema for local and remote runs) from what the device measured:
    ``latency``, ``samples_ms``, ``outputs``, ``memory``, ``environment``, ``device``."""
    got = np.asarray(dev["outputs"]).reshape(len(job.x), -1)
    res: dict[str, Any] = {
        "artifact": job.art.key, "kind": job.art.kind, "target": job.target, "profile": job.profile,
        "threads": job.cfg.threads, "device": dev["device"], "latency": dev["latency"],
        "agreement": compare([job.ref_out], [got]).to_json(),
    }
    if job.labels is not None:
        res["accuracy"] = {"dataset": job.labels.dataset, "samples": len(job.x),
                           "task_accuracy": task_accuracy(got, job.labels.y),
                           "reference_accuracy": task_accuracy(job.ref_out, job.labels.y)}
    res["size_bytes"] = job.art.payload.stat().st_size
    res["memory"] = dev["memory"]
    res["environment"] = dev["environment"]
    res["bench_config"] = asdict(job.cfg)
    res["latency_samples_ms"] = dev["samples_ms"]
    return res
