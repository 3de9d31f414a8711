"""Compression passes measured on the target -> benchmarks/results/passes.md and passes.json.

    nice python -m benchmarks.bench_passes [--duration 3.0] [--train] [--skip-g2g-zoo] [--skip-int8 --name NAME]

Every row compares a pass's output with its own baseline (fp32 / dense masked) compiled for the same target
(ONNX Runtime CPU EP, the profile's thread count, batch 1) and timed interleaved in this process.

1. int8-auto (accuracy-controlled, max drop 1 point) on mlp-1m and every other zoo model whose trained
   weights are in the cache (``--train`` trains mlp-1m / g2gnet when missing); accuracy on the full real
   Fashion-MNIST test set at batch 1, before and after.
2. Honest sparsity rows on mlp-1m: unstructured pruning (no ORT speed-up), the same with only_if_faster
   (kept dense, never slower), structured neuron slicing (faster, costs accuracy).
3. Modular lowering: the G2GNet zoo model (if present) and a synthetic G2GNet-shaped stack
   (784-1024-1024-10, 8 groups, 75 % column-structured sparsity, labelled synthetic) vs the same network
   stored as dense masked matrices; max relative error on 1000 real test images.
4. The same modular lowering on TVM (pass run for target tvm, both sparse layers on the grouped GEMV
   kernel) vs the dense masked network on TVM with the packed dense GEMV, plus the dense masked network
   with TVM's default kernels for reference.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks._common import (
    PROFILE,
    Table,
    command_line,
    kernel_summary,
    measure,
    profile,
    write_results,
)
from kernels.tvm.testing import with_kernels
from targets import get_target
from tests.fixtures.synthetic import g2g_masked_mlp
from toolchain import api
from toolchain.core.cache import Artifact, Cache, MissingArtifact, ReadOnlyCache
from toolchain.core.onnx_io import fix_batch, input_specs, load_onnx, param_count
from toolchain.core.profile import Profile
from toolchain.core.versions import cpu_model
from toolchain.measure.compare import task_accuracy
from toolchain.measure.timing import run_batched
from toolchain.zoo.datasets import Dataset, fashion_mnist
from toolchain.zoo.registry import entries, get_entry
from toolchain.zoo.trained import load_trained

TARGET = "ort"
HEADER = ["model", "pass", "target", "profile", "p50 (us)", "p90 (us)", "baseline p50 (us)", "ratio vs baseline",
          "accuracy % before -> after", "notes"]
MODULAR_HEADER = [*HEADER[:8], "accuracy % dense -> modular", HEADER[9]]


def trained_in_cache(name: str, cache: Cache, data: Dataset) -> bool:
    """Asks load_trained itself (the one place that knows the weights' key), with a cache that never trains."""
    try:
        load_trained(get_entry(name), ReadOnlyCache(cache.root), progress=False, data=data)
    except MissingArtifact:
        return False
    return True


class Bench:
    def __init__(self, cache: Cache, duration: float) -> None:
        self.cache, self.duration = cache, duration
        self.profile = profile()

    def compiled(self, art: Artifact, target: str, prof: Profile) -> tuple[Any, list[dict[str, Any]]]:
        """(a runner factory for ``art`` compiled for ``target``, its kernel table)."""
        out, _ = api.compile(art, profile=prof, target=target, cache=self.cache)
        tgt = get_target(target)
        return (lambda: tgt.load(out)), list(out.meta.get("kernels", []))

    def compare(self, arts: dict[str, Artifact], x: np.ndarray, y: np.ndarray | None, target: str = TARGET,
                profiles: dict[str, Profile] | None = None) -> dict[str, dict[str, Any]]:
        """Latency (interleaved, batch 1) and, per model, outputs / accuracy on x at batch 1. ``profiles``
        overrides the profile per key (e.g. a TVM baseline with one kernel switched off)."""
        spec = input_specs(fix_batch(load_onnx(next(iter(arts.values())).payload, check=False), 1))[0]
        built = {k: self.compiled(a, target, (profiles or {}).get(k, self.profile)) for k, a in arts.items()}
        feed = {spec.name: x[:1].reshape(spec.shape)}
        lat = measure({k: (f, feed) for k, (f, _) in built.items()}, self.duration, self.profile)
        res: dict[str, dict[str, Any]] = {}
        for k, (make_runner, kernels) in built.items():
            with make_runner() as runner:
                out = run_batched(runner, spec.name, x, spec.shape)
            res[k] = {"p50": lat[k].p50_ms * 1000, "p90": lat[k].p90_ms * 1000, "latency": lat[k], "out": out,
                      "kernels": kernels, "acc": task_accuracy(out, y) * 100 if y is not None else None}
        return res


def fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{a:.2f}"


def add_row(table: Table, model: str, pas: str, r: dict[str, Any], base: dict[str, Any], extra: str,
            target: str = TARGET) -> None:
    ratio = base["p50"] / r["p50"]
    table.add([model, pas, target, PROFILE, f"{r['p50']:.1f}", f"{r['p90']:.1f}", f"{base['p50']:.1f}",
               f"**{ratio:.2f}x**", f"{fmt_acc(base['acc'])} -> {fmt_acc(r['acc'])}", extra],
              latency=r["latency"], baseline=base["latency"], ratio=ratio, accuracy_before=base["acc"],
              accuracy_after=r["acc"])


def modular_tvm(b: Bench, mods: list[tuple[str, Artifact]], x: np.ndarray, y: np.ndarray,
                checks: list[str], table: Table) -> None:
    """Modular lowering on TVM vs the same network as dense masked matrices on TVM. Baseline: the dense
    masked network with the packed GEMV kernel and grouped GEMV off (TVM's fast dense path). Also timed:
    the dense masked network with the default kernels (the grouped GEMV may pick a sparse layer by itself)."""
    packed = with_kernels(b.profile, use_grouped_matmul=False)
    for label, art in mods:
        o, rep = api.optimize(art, ["modular"], cache=b.cache, profile=b.profile, target="tvm")
        res = b.compare({"dense": art, "dense-default": art, "modular": o}, x, y, "tvm",
                        {"dense": packed, "dense-default": b.profile})
        ref = res["dense"]["out"]
        errs = {k: float(np.abs(res[k]["out"] - ref).max() / np.abs(ref).max()) for k in ("dense-default", "modular")}
        short = "g2gnet (zoo)" if "zoo" in label else "the synthetic G2GNet-shaped stack"
        add_row(table, label, "- (dense masked, default kernels)", res["dense-default"], res["dense"],
                f"{kernel_summary(res['dense-default']['kernels'])}; max rel err {errs['dense-default']:.1e}", "tvm")
        lowered = [r for r in rep[0]["report"]["layers"] if r["applied"]]
        add_row(table, label, "`modular` (gather=take)", res["modular"], res["dense"],
                f"{kernel_summary(res['modular']['kernels'])}; {len(lowered)} layers lowered; "
                f"max rel err {errs['modular']:.1e}", "tvm")
        ratio = res["dense"]["p50"] / res["modular"]["p50"]
        vs_default = res["dense-default"]["p50"] / res["modular"]["p50"]
        ok = ratio >= 2.5 and errs["modular"] <= 1e-5
        checks.append(f"- `modular` on {short}, target tvm: {ratio:.2f}x vs dense masked with packed GEMV "
                      f"(target >= 2.5x; {vs_default:.2f}x vs dense masked with default kernels), max rel err "
                      f"{errs['modular']:.1e} (target <= 1e-5): **{'met' if ok else 'NOT met'}**")


def int8_section(b: Bench, ds: Dataset, train: bool, table: Table, reports: list[str], checks: list[str]) -> None:
    """int8-auto on every trained fashion-mnist 784-input zoo model; on mlp-1m also the other passes."""
    cache = b.cache
    names = [n for n, e in entries().items() if e.dataset == "fashion-mnist" and e.input_shape == (1, 784)]
    for name in names:
        must = name in ("mlp-1m",) and train
        if not must and not trained_in_cache(name, cache, ds):
            print(f"skip {name}: no trained weights in the cache (run with --train or 'edgec zoo train {name}')")
            continue
        art, _ = api.export(name, cache=cache, progress=False)
        q, rep = api.optimize(art, ["int8-auto"], cache=cache, profile=b.profile)
        r = rep[0]["report"]
        res = b.compare({"fp32": art, "int8": q}, ds.x_test, ds.y_test)
        params = param_count(load_onnx(art.payload, check=False))
        model = f"{name} ({params / 1e6:.2f} M params)"
        drop = res["fp32"]["acc"] - res["int8"]["acc"]
        add_row(table, model, "int8-auto", res["int8"], res["fp32"],
                f"{r['int8_layers']}/{len(r['layers'])} layers int8, drop {drop:.2f} pt")
        precisions = [f"{x['layer']}={x['precision']}"
                      + (f" (sens {x['sensitivity_points']})" if "sensitivity_points" in x else "")
                      for x in r["layers"]]
        reports.append(f"- {name}: " + ", ".join(precisions))
        if params >= 1e6:
            ratio = res["fp32"]["p50"] / res["int8"]["p50"]
            ok = ratio >= 1.8 and drop <= 1.0
            checks.append(f"- int8-auto on {name} ({params / 1e6:.2f} M params, >= 1 M): {ratio:.2f}x "
                          f"(target >= 1.8x), drop {drop:.2f} pt (target <= 1): **{'met' if ok else 'NOT met'}**")
        if name == "mlp-1m":
            passes = [("int8=mode=static", "int8 static QDQ, per-channel, 512 calibration images"),
                      ("prune=density=0.25", "unstructured 75 % zeros: ORT GEMM is dense, no speed-up"),
                      ("prune=density=0.25,only_if_faster=true", "only_if_faster: every layer measured, kept dense"),
                      ("structured=keep=0.5", "half the hidden neurons sliced away (no fine-tuning)")]
            for text, note in passes:
                o, _ = api.optimize(art, [text], cache=cache, profile=b.profile)
                res = b.compare({"fp32": art, "pass": o}, ds.x_test, ds.y_test)
                add_row(table, model, f"`{text}`", res["pass"], res["fp32"], note)


def modular_section(b: Bench, mods: list[tuple[str, Artifact]], work: Path, x: np.ndarray, y: np.ndarray,
                    table: Table, per_layer: list[str], checks: list[str]) -> None:
    """Modular lowering on ORT, each network as is and pinned to batch 1 (constant gather indices)."""
    variants = []
    for i, (label, art) in enumerate(mods):
        p1 = work / f"{i}_b1.onnx"
        onnx.save_model(fix_batch(load_onnx(art.payload, check=False), 1), p1)
        variants += [(label, art, "modular"),
                     (label + ", batch pinned to 1", api.import_onnx(p1, cache=b.cache)[0], "modular=batch1=true")]
    for label, art, text in variants:
        o, rep = api.optimize(art, [text], cache=b.cache, profile=b.profile)
        res = b.compare({"dense": art, "modular": o}, x, y)
        ref, got = res["dense"]["out"], res["modular"]["out"]
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        add_row(table, label, f"`{text}` (gather={rep[0]['report']['gather']})", res["modular"], res["dense"],
                f"max rel err {err:.1e} on 1000 real test images")
        ratio = res["dense"]["p50"] / res["modular"]["p50"]
        checks.append(f"- `{text}` on {'g2gnet (zoo)' if 'zoo' in label else 'the synthetic G2GNet-shaped stack'}"
                      f"{' pinned to batch 1' if 'batch1' in text else ''}: "
                      f"{ratio:.2f}x vs dense masked (target >= 2.5x), max rel err {err:.1e} (target <= 1e-5): "
                      f"**{'met' if ratio >= 2.5 and err <= 1e-5 else 'NOT met'}**")
        for lr in (rep[0]["report"]["layers"] if "batch1" not in text else []):
            if lr["applied"]:
                regrouped = " (outputs regrouped)" if lr.get("output_permuted") else ""
                what = f"G={lr['groups']} K={lr['k']}{regrouped}, lowered"
            else:
                what = f"left dense ({lr['why']})"
            per_layer.append(f"- {label} / {lr['layer']} {lr['shape']}: density {lr['density']}, {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=3.0, help="Timed seconds per candidate (over all rounds).")
    ap.add_argument("--train", action="store_true", help="Train mlp-1m / g2gnet if their weights are not cached.")
    ap.add_argument("--skip-g2g-zoo", action="store_true")
    ap.add_argument("--skip-int8", action="store_true", help="Modular sections only (for iterating; with --name).")
    ap.add_argument("--name", default="passes", help="results/<name>.md|json (another name while iterating)")
    args = ap.parse_args()

    t0 = time.monotonic()
    cache = Cache()
    b = Bench(cache, args.duration)
    ds = fashion_mnist()
    int8_table, ort_table, tvm_table = Table(HEADER), Table(MODULAR_HEADER), Table(MODULAR_HEADER)
    reports: list[str] = []
    checks: list[str] = []
    per_layer: list[str] = []
    if not args.skip_int8:
        int8_section(b, ds, args.train, int8_table, reports, checks)

    x = ds.x_test[:1000]
    mods: list[tuple[str, Artifact]] = []
    if not args.skip_g2g_zoo and "g2gnet" in entries() and (args.train or trained_in_cache("g2gnet", cache, ds)):
        art, _ = api.export("g2gnet", cache=cache, progress=False)
        mods.append(("g2gnet (zoo, trained)", art))
    else:
        print("skip zoo g2gnet: no trained weights in the cache")
    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "g2g_synthetic.onnx"
        onnx.save_model(g2g_masked_mlp((784, 1024, 1024, 10), groups=8, density=0.25, seed=0), p)
        syn, _ = api.import_onnx(p, cache=cache)
        mods.append(("SYNTHETIC G2GNet-shaped 784-1024-1024-10 (8 groups, 75 % column-structured)", syn))
        modular_section(b, mods, Path(td), x, ds.y_test, ort_table, per_layer, checks)
        modular_tvm(b, mods, x, ds.y_test, checks, tvm_table)

    command = command_line("benchmarks.bench_passes")
    md = [
        "## Compression passes (`benchmarks/bench_passes.py`)", "",
        (f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.monotonic() - t0:.0f} s. "
         f"Target `{TARGET}` (ONNX Runtime CPU EP, {b.profile.bench.threads} thread, batch 1), profile `{PROFILE}`, "
         f"CPU {cpu_model()}. Baseline = the same model without the pass, compiled for the same target and "
         "timed interleaved in the same run; ratio = baseline p50 / pass p50. Accuracy: full Fashion-MNIST "
         "test set (10000), batch 1."), "",
        "### INT8, accuracy-controlled (`int8-auto`, max drop 1.0 point)", "", int8_table.markdown(), "",
        "Per-layer precision chosen by int8-auto:", "", *reports, "",
        "### Modular lowering (`modular`) vs the same network as dense masked matrices", "", ort_table.markdown(), "",
        "Per layer:", "", *per_layer, "",
        "### Modular lowering on TVM (`modular`, target tvm) vs the same network as dense masked matrices on TVM", "",
        ("Baseline = the dense masked network on TVM with the packed GEMV kernel (grouped GEMV off): every layer a "
         "dense GEMV over the zeros. `dense masked, default kernels` = the same dense network with the profile's "
         "kernels (the grouped GEMV takes every layer whose zero rows it can skip, regrouping interleaved outputs "
         "itself). Batch 1, interleaved; max rel err vs the baseline's outputs on 1000 real test images."), "",
        tvm_table.markdown(), "",
        "### Targets", "", *checks,
    ]
    out = write_results(args.name, md, {
        "command": command, "duration_s": args.duration, "profile": PROFILE, "target": TARGET,
        "wall_s": round(time.monotonic() - t0, 1), "checks": checks, "int8_layers": reports,
        "modular_layers": per_layer,
        "tables": {"int8": int8_table.to_json(), "modular_ort": ort_table.to_json(),
                   "modular_tvm": tvm_table.to_json()}})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
