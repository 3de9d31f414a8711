"""Helpers the benchmark scripts share: the profile, timing through ``toolchain.measure.timing``, runner
factories for ONNX Runtime and TVM builds, zoo export in a child process, result rows and the results writer
(``benchmarks/results/<name>.md`` and ``<name>.json``).

Scripts run from the repository root as modules: ``nice python -m benchmarks.bench_tvm``. This module imports
neither torch nor TVM at import time (the zoo export runs torch in a child process: torch and TVM should not
share one).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from kernels.tvm.testing import dense_onnx
from targets.ort import OrtRunner
from targets.tvm.build import build_library
from toolchain.core.onnx_io import input_specs
from toolchain.core.profile import Profile, load_profile
from toolchain.core.text import markdown_table, write_atomic
from toolchain.core.versions import environment
from toolchain.device.runners import TvmLibRunner
from toolchain.measure.timing import Latency, MeasureConfig, RunnerFactory, measure_interleaved

PROFILE = "x86-avx512"
BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

Feed = dict[str, np.ndarray]


def profile() -> Profile:
    return load_profile(PROFILE)


def measure(candidates: dict[str, tuple[RunnerFactory, Feed]], duration_s: float,
            prof: Profile | None = None) -> dict[str, Latency]:
    """Every candidate timed interleaved (``measure_interleaved``) with the profile's bench settings and
    ``duration_s`` timed seconds per candidate."""
    cfg = MeasureConfig.from_profile((prof or profile()).bench, duration_s)
    return measure_interleaved(candidates, cfg)


def ort_factory(path: Path, threads: int) -> RunnerFactory:
    """Loads ``path`` in a fresh ONNX Runtime session on every call."""
    return lambda: OrtRunner(path, threads)


def tvm_build(model_path: Path, prof: Profile, out_dir: Path, tag: str,
              tuning_db: Path | None = None) -> tuple[RunnerFactory, dict[str, Any]]:
    """Build ``model_path`` for ``prof`` into ``out_dir/<stem>.<tag>.so``: (a factory loading it, the build meta)."""
    lib = out_dir / f"{model_path.stem}.{tag}.so"
    meta = build_library(onnx.load(str(model_path)), prof, lib, tuning_db=tuning_db)
    names = [i["name"] for i in meta["inputs"]]
    threads = prof.bench.threads
    return (lambda: TvmLibRunner(lib, names, threads)), meta


def infer_once(make_runner: RunnerFactory, feed: Feed) -> list[np.ndarray]:
    with make_runner() as runner:
        return runner.infer(feed)


def max_abs_err(a: RunnerFactory, b: RunnerFactory, feed: Feed) -> float:
    return float(np.max(np.abs(infer_once(a, feed)[0] - infer_once(b, feed)[0])))


def feed_for(path: Path) -> Feed:
    """Seeded standard-normal inputs for every input of the ONNX model at ``path``."""
    rng = np.random.default_rng(0)
    return {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in input_specs(onnx.load(str(path)))}


def kernel_summary(kernels: list[dict[str, Any]]) -> str:
    """'2 gemv-packed-f32, 3 rule': how many kernels of each kind (hand-written name, else origin)."""
    counts: dict[str, int] = {}
    for k in kernels:
        key = k.get("kernel") or k.get("origin", "?")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "-"


def us(ms: float) -> str:
    """Milliseconds as microseconds, one decimal."""
    return f"{ms * 1000:.1f}"


def fmt_row(model: str, pas: str, target: str, p50_ms: float, p90_ms: float, base: str, ratio: float,
            notes: str) -> list[str]:
    """The row every latency table uses: model, pass, target, profile, p50/p90 (us), baseline, ratio, notes."""
    return [model, pas, target, PROFILE, us(p50_ms), us(p90_ms), base, f"{ratio:.2f}x", notes]


ROW_HEADER = ["model", "pass", "target", "profile", "p50 (us)", "p90 (us)", "baseline", "ratio vs baseline", "notes"]


def same_size_mlp(path: Path, work: Path) -> tuple[Path, int, int]:
    """A 784-h-10 MLP with as many parameters as the model at ``path`` (random weights): (path, h, params)."""
    params = sum(numpy_helper.to_array(t).size for t in onnx.load(str(path)).graph.initializer)
    h = max(1, round((params - 10) / 795))  # 784*h + h + 10*h + 10 parameters
    rng = np.random.default_rng(0)
    mlp_path = work / f"mlp-like-{path.stem}.onnx"
    onnx.save(dense_onnx([rng.standard_normal((784, h)).astype(np.float32) * 0.03,
                          rng.standard_normal((h, 10)).astype(np.float32) * 0.03],
                         [np.zeros(h, np.float32), np.zeros(10, np.float32)]), mlp_path)
    return mlp_path, h, params


def weight_mb(path: Path) -> float:
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer) / 1e6


@dataclass
class Table:
    """Rows of one markdown table, each with its raw numbers (latencies, ratio) for the JSON file."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)

    def add(self, cells: list[str], **raw: Any) -> list[str]:
        """Append a row (printed as it comes); ``raw`` values that are Latency objects are stored as JSON."""
        if len(cells) != len(self.header):
            raise ValueError(f"row has {len(cells)} cells, the table {len(self.header)}: {cells}")
        self.rows.append(cells)
        self.raw.append({k: v.to_json() if isinstance(v, Latency) else v for k, v in raw.items()})
        print(" | ".join(cells), flush=True)
        return cells

    def markdown(self) -> str:
        return markdown_table(self.header, self.rows)

    def to_json(self) -> list[dict[str, Any]]:
        return [{**dict(zip(self.header, r, strict=True)), "raw": raw}
                for r, raw in zip(self.rows, self.raw, strict=True)]


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def command_line(module: str, argv: list[str] | None = None) -> str:
    """How a script was run, for the results header: 'nice python -m benchmarks.bench_tvm --duration 1.0'."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["nice python -m", module, *args])


def write_results(name: str, markdown: list[str], data: dict[str, Any]) -> Path:
    """Write ``results/<name>.md`` (the section BENCHMARKS.md collects) and ``results/<name>.json`` (``data``
    plus where and when it was measured). Returns the markdown path."""
    import json

    md = RESULTS_DIR / f"{name}.md"
    write_atomic(md, "\n".join(markdown).rstrip() + "\n")
    payload = {"name": name, "generated": stamp(), "environment": environment(), **data}
    write_atomic(RESULTS_DIR / f"{name}.json", json.dumps(payload, indent=1, default=_json_default) + "\n")
    return md


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Latency):
        return obj.to_json()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def table_section(title: str, command: str, setup: str, table: Table, notes: list[str],
                  legend: list[str]) -> list[str]:
    """A results section: '## title', the command and time, one table, notes, legend."""
    return [f"## {title}", "", f"`{command}`, {stamp()}. {setup}", "", table.markdown(), "", *notes, "", *legend]


# Zoo export (torch) in a child process, so the measuring process stays torch-free.

def export_zoo_in_child(out: Path, names: list[str]) -> list[str]:
    """Export zoo entries (all, or ``names``) to ``out/<name>.onnx`` in a child process; the 'SKIP ...' lines
    of entries that did not export."""
    r = subprocess.run([sys.executable, "-m", "benchmarks._common", "export", str(out), *names], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    print(r.stdout, flush=True)
    if r.returncode:
        print(r.stderr[-2000:], file=sys.stderr, flush=True)
    return [ln for ln in r.stdout.splitlines() if ln.startswith("SKIP")]


def _module_for_export(e: Any) -> Any:
    """The untrained module (latency does not depend on weight values), or, for an entry whose export
    needs a training-time decision (S-KAN's frozen basis choice), its trained weights from the cache."""
    from toolchain.core.cache import Cache, MissingArtifact, ReadOnlyCache
    from toolchain.zoo.trained import load_trained

    module = e.build(e.recipe).eval()
    try:
        return e.export_module(module, e.forms[0]) if e.export_module is not None else module
    except ValueError as untrained_error:
        try:
            module = load_trained(e, ReadOnlyCache(Cache().root), progress=False)[0]
        except MissingArtifact:
            raise ValueError(f"{untrained_error} (and no trained weights in the cache: edgec zoo train {e.name})"
                             ) from None
        return e.export_module(module, e.forms[0])


def export_zoo(out: Path, names: list[str]) -> None:
    """Child-process entry: export zoo entries to ``out/<name>.onnx`` (seeded initial weights, cleanup pass)."""
    import torch

    from toolchain.export import torch_to_onnx
    from toolchain.passes.cleanup import Config as CleanupConfig
    from toolchain.passes.cleanup import run as cleanup
    from toolchain.zoo.registry import entries

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    for name, e in entries().items():
        if names and name not in names:
            continue
        try:
            module = _module_for_export(e)
            x = torch.randn(*e.input_shape)  # input_shape already has the batch dim
            example = e.example_inputs(module, e.forms[0], x) if e.example_inputs else (x,)
            model = cleanup(torch_to_onnx(module, example, dynamic_batch=False), CleanupConfig()).model
            onnx.save(model, out / f"{name}.onnx")
            print(f"exported {name}", flush=True)
        except Exception as ex:  # noqa: BLE001 -- one family failing must not hide the others
            print(f"SKIP {name}: export failed: {type(ex).__name__}: {str(ex)[:160]}", flush=True)


def _main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "export":
        print("usage: python -m benchmarks._common export OUT_DIR [NAME ...]", file=sys.stderr)
        return 2
    export_zoo(Path(argv[1]), argv[2:])
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
