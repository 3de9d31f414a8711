"""TVM with MetaSchedule tuning for the layers no hand-written kernel covers -> results/tvm_tuned.md and .json.

    nice python -m benchmarks.bench_tvm_tuned [--models convkan skan kan-fast snn-mlp] [--trials auto|N] [--cold]

For each model: `edgec build MODEL --target ort --target tvm [--tune-trials N]` -- by default the CLI's own
default budget, "auto": the profile's tuning.auto_trials where a heavy layer has no hand-written kernel, 0
trials elsewhere (the other models show that 0-minute case) -- (tuning records persist per
profile in the cache, so a rerun reuses them; tuning wall time is reported from the first run), then
ORT and tuned TVM timed interleaved in one process by `api.build`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import PROFILE, ROW_HEADER, Table, command_line, us, write_results
from targets.base import CompileOptions, TuneOptions
from toolchain import api
from toolchain.core.cache import Cache, MissingArtifact, ReadOnlyCache
from toolchain.zoo.registry import get_entry
from toolchain.zoo.trained import load_trained

HEADER = [*ROW_HEADER[:-1], "accuracy", "notes"]


def _budget(tvm: dict[str, Any], trials: int | None) -> str:
    """What the build actually tuned with: 'auto: 96 trials' / 'auto: 0 trials' / '96 trials'."""
    if trials is not None:
        return f"{trials} trials"
    auto = tvm.get("auto_tuning") or {}
    return f"auto: {auto.get('trials', '?')} trials"


def cold_cache(models: list[str], root: Path) -> Cache:
    """A cache at ``root`` holding only the models' trained weights (copied from the default cache, so
    nothing retrains): every compile and every tuning record is made from scratch."""
    src, dst = Cache(), Cache(root)
    for name in models:
        try:
            art = load_trained(get_entry(name), ReadOnlyCache(src.root), progress=False)[2]
        except MissingArtifact:
            continue  # trains in the cold cache: slower, still correct
        shutil.copytree(art.dir, dst.path_for(art.key))
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=["convkan", "skan", "kan-fast", "snn-mlp"])
    ap.add_argument("--trials", default="auto", help="auto (the CLI default) or a number of trials")
    ap.add_argument("--duration", type=float, default=2.0, help="Timed seconds per target (over all rounds).")
    ap.add_argument("--cold", action="store_true",
                    help="tune from an empty database (a temp cache holding only the trained weights): the real cost")
    args = ap.parse_args()

    trials = None if args.trials == "auto" else int(args.trials)
    options = CompileOptions(tune=TuneOptions(trials=trials, progress=False))
    tmp = tempfile.TemporaryDirectory(prefix="edgec-cold-") if args.cold else None
    cache = cold_cache(args.models, Path(tmp.name)) if tmp else Cache()
    table = Table(HEADER)
    walls: dict[str, float] = {}
    for name in args.models:
        t0 = time.monotonic()
        rep = api.build(name, profile=PROFILE, cache=cache, targets=["ort", "tvm"], passes=["cleanup"], samples=0,
                        duration_s=args.duration, options=options, progress=False)
        wall = walls[name] = time.monotonic() - t0
        ort, tvm = rep["targets"]["ort"], rep["targets"]["tvm"]
        ratio = tvm["latency"]["p50_ms"] / ort["latency"]["p50_ms"]
        origins: dict[str, int] = {}
        for k in tvm.get("kernels", []):
            origins[k["origin"]] = origins.get(k["origin"], 0) + 1
        for t, r, r_ratio, note in (
            ("ort", ort, 1.0, "vendor"),
            (f"tvm ({_budget(tvm, trials)})", tvm, ratio,
             ", ".join(f"{n} {o}" for o, n in origins.items()) + f"; build+tune wall {wall:.0f} s"),
        ):
            acc = r.get("accuracy", {}).get("task_accuracy")
            lat = r["latency"]
            table.add([name, "cleanup", t, PROFILE, us(lat["p50_ms"]), us(lat["p90_ms"]), "ort", f"{r_ratio:.2f}x",
                       "-" if acc is None else f"{acc * 100:.2f} %", note],
                      latency=lat, ratio=r_ratio, task_accuracy=acc)
    if tmp is not None:
        tmp.cleanup()
    command = command_line("benchmarks.bench_tvm_tuned")
    md = [
        "## TVM with MetaSchedule tuning (`benchmarks/bench_tvm_tuned.py`)", "",
        (f"`{command}` (trials {args.trials}; auto = the CLI's default budget), "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Batch 1, 1 thread, fp32; ORT and TVM timed "
         "interleaved in one process by `api.build`; ratio = TVM p50 / ORT p50. Tuning records persist per "
         "profile in the cache: "
         + ("this run started from an EMPTY database: the wall time is the full cost of the default budget."
            if args.cold else "the wall time is the tuning cost only on a cold database (see --cold).")), "",
        table.markdown(),
    ]
    out = write_results("tvm_tuned", md, {"command": command, "trials": args.trials, "cold": args.cold,
                                          "duration_s": args.duration, "profile": PROFILE, "wall_s": walls,
                                          "rows": table.to_json()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
