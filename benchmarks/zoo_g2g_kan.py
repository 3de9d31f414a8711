"""Train (through the weights cache) and export every G2GNet / KAN zoo entry with its DEFAULT recipe,
then write benchmarks/results/zoo/zoo_g2g_kan.md and .json: accuracy, sparsity, parameters, training time, ONNX
parity, and the issue's comparisons (G2GNet vs the dense MLP of equal size, S-KAN vs the best
single-basis KAN of the same size).

    nice .venv/bin/python -m benchmarks.zoo_g2g_kan [--only NAME ...] [--seeds 0 1] [--cache-dir DIR]

``--only`` retrains/exports only the named entries and keeps the other rows of the existing
benchmarks/results/zoo/zoo_g2g_kan.json (marked "kept from the previous run" in the table). ``--seeds`` adds
training seeds for the S-KAN vs FastKAN comparison (seed 0 is always the table's row).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from toolchain.core.cache import Cache, default_cache_root
from toolchain.export import export_model, run_ort
from toolchain.measure.compare import Parity, compare
from toolchain.zoo.datasets import fashion_mnist
from toolchain.zoo.registry import get_entry
from toolchain.zoo.trained import load_trained

OUT = Path(__file__).resolve().parent / "results" / "zoo" / "zoo_g2g_kan.md"

NAMES = ("g2gnet", "g2gnet-weight", "g2gnet-dense-match", "kan-bspline", "kan-fast", "kan-cheby", "kan-fast-long",
         "skan", "skan-local", "convkan")
SINGLE_BASIS = ("kan-bspline", "kan-fast", "kan-cheby")  # default recipes (6 epochs)
SKANS = ("skan", "skan-local")
SEEDED = ("kan-fast", "kan-fast-long", "skan")  # the comparison --seeds repeats (the issue names the 3-basis skan)


def seed_accuracy(name: str, cache: Cache, seed: int) -> float:
    """Test accuracy of ``name`` trained (through the cache) with another seed."""
    _module, metrics, _art, _hit = load_trained(get_entry(name), cache, seed=seed, progress=False)
    return float(metrics["test_accuracy"])


def run_entry(name: str, cache: Cache) -> dict[str, Any]:
    entry = get_entry(name)
    t0 = time.monotonic()
    module, metrics, _art, hit = load_trained(entry, cache, progress=False)
    onnx_art, _ = export_model(name, cache, progress=False)
    parity = onnx_art.meta.get("parity") or {}
    full = full_test_parity(module, onnx_art.payload, entry.input_shape)
    return {
        "model": name, "family": entry.family, "summary": entry.summary,
        "test_accuracy": metrics["test_accuracy"], "sparsity": metrics.get("sparsity"),
        "params": metrics.get("params"), "nonzero_weights": metrics.get("nonzero_weights"),
        "train_seconds": metrics.get("train_seconds"), "epochs": metrics.get("epochs"),
        "cache_hit": hit, "wall_seconds": round(time.monotonic() - t0, 1),
        "parity_max_rel": parity.get("max_rel"), "parity_argmax": parity.get("argmax_agreement"),
        "full_test_max_rel": full.max_rel, "full_test_argmax": full.argmax_agreement, "full_test_samples": full.samples,
        "extra": {k: metrics[k] for k in ("full_pool_accuracy", "selected_untuned_accuracy", "choices",
                                          "params_full_pool", "rewired_connections", "holdout_accuracy_full_pool",
                                          "holdout_accuracy_selected", "select_seconds", "gate_confidence")
                                         if k in metrics},
        "recipe": dict(entry.recipe),
    }


def full_test_parity(module: Any, onnx_path: Path, input_shape: tuple[int, ...]) -> Parity:
    """ONNX Runtime vs the trained torch module (not its export form) on all 10k real test images."""
    x = fashion_mnist().x_test.reshape(-1, *input_shape[1:])
    model = onnx.load(str(onnx_path))
    chunks = [x[i:i + 1000] for i in range(0, len(x), 1000)]
    with torch.no_grad():
        ref = np.concatenate([module(torch.from_numpy(c)).numpy() for c in chunks])
    got = np.concatenate([o[0] for o in run_ort(model, [{model.graph.input[0].name: c} for c in chunks])])
    return compare([ref], [got])


def checks(rows: dict[str, dict[str, Any]], seeds: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(claim: str, ok: bool, detail: str) -> None:
        out.append({"claim": claim, "ok": bool(ok), "detail": detail})

    if "g2gnet" in rows:
        g = rows["g2gnet"]
        add("G2GNet >= 75 % sparse", g["sparsity"] >= 0.75, f"sparsity {g['sparsity']:.4f}")
        add("G2GNet >= 89 % test accuracy", g["test_accuracy"] >= 0.89, f"{g['test_accuracy']:.4f}")
        if "g2gnet-dense-match" in rows:
            d = rows["g2gnet-dense-match"]
            add("G2GNet >= dense MLP with the same nonzero weight count", g["test_accuracy"] >= d["test_accuracy"],
                f"{g['test_accuracy']:.4f} vs {d['test_accuracy']:.4f} "
                f"({g['nonzero_weights']} vs {d['nonzero_weights']} weights)")
    for name in SINGLE_BASIS:
        if name in rows:
            add(f"{name} >= 87 %", rows[name]["test_accuracy"] >= 0.87, f"{rows[name]['test_accuracy']:.4f}")
    singles = [rows[n] for n in SINGLE_BASIS if n in rows]
    for name in SKANS:
        if name in rows and singles:
            best = max(singles, key=lambda r: r["test_accuracy"])
            s = rows[name]
            add(f"{name} (pool {'/'.join(s['recipe']['pool'])}) >= best single-basis KAN of the same size "
                "(784-64-10, 8 functions per edge)", s["test_accuracy"] >= best["test_accuracy"],
                f"{s['test_accuracy']:.4f} vs {best['model']} {best['test_accuracy']:.4f}")
        if name in rows and "kan-fast-long" in rows:
            s, f = rows[name], rows["kan-fast-long"]
            same = s["epochs"] == f["epochs"]
            add(f"{name} >= FastKAN with the same total epoch budget (kan-fast-long)",
                same and s["test_accuracy"] >= f["test_accuracy"],
                f"{s['test_accuracy']:.4f} vs {f['test_accuracy']:.4f} ({s['epochs']} vs {f['epochs']} epochs"
                f"{'' if same else ': budgets differ, comparison void'})")
        for ref in ("kan-fast", "kan-fast-long"):
            if name in seeds and ref in seeds and len(seeds[name]) > 1 and seeds[name].keys() == seeds[ref].keys():
                a, b = seeds[name], seeds[ref]
                diff = sum(a.values()) / len(a) - sum(b.values()) / len(b)
                noise = max(max(v.values()) - min(v.values()) for v in (a, b))  # seed-to-seed spread
                wins = all(a[k] > b[k] for k in a)
                add(f"{name} beats {ref} beyond seed noise (seeds {', '.join(sorted(a))}: wins every seed "
                    "and mean gap > the larger seed-to-seed spread)", wins and diff > noise,
                    f"mean gap {diff * 100:+.2f} pt, spread {noise * 100:.2f} pt; {name} "
                    f"{', '.join(f'{v:.4f}' for v in a.values())} vs {ref} {', '.join(f'{v:.4f}' for v in b.values())}")
    for name, r in rows.items():
        ok = r["parity_max_rel"] is not None and r["parity_max_rel"] <= 1e-4 and r["parity_argmax"] == 1.0
        add(f"{name}: ONNX Runtime parity (exporter gate, 1000 test samples)", ok,
            f"max rel {r['parity_max_rel']:.1e}, argmax {r['parity_argmax']}")
        ok = r["full_test_max_rel"] <= 1e-4 and r["full_test_argmax"] == 1.0
        add(f"{name}: ONNX Runtime vs trained torch module, full test set", ok,
            f"max rel {r['full_test_max_rel']:.1e}, argmax {r['full_test_argmax']} on {r['full_test_samples']} images")
        budget = r["train_seconds"] is not None and r["train_seconds"] <= 600
        add(f"{name}: default recipe trains in <= 10 min", budget, f"{r['train_seconds']} s")
    return out


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def write(rows: dict[str, dict[str, Any]], seeds: dict[str, dict[str, float]], out: Path) -> None:
    cks = checks(rows, seeds)
    lines = [
        "# Zoo: G2GNet and KAN families on Fashion-MNIST",
        "",
        (f"Written by `python -m benchmarks.zoo_g2g_kan` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()}, shared 2-core machine, 1-min load average {os.getloadavg()[0]:.1f} when written: "
        "training seconds are noisy and were measured while other jobs ran). Default recipes, seed 0, "
        "full 60k train / 10k test split; trained weights come from the edgec cache when present "
        "(train seconds are those of the run that trained them)."),
        "",
        "Rows marked * were kept from the previous run of this script (`--only` reran the others).",
        "",
        ("| model | test acc | sparsity | params (nonzero) | epochs | train s | ONNX max rel (10k) "
         "| argmax agree (10k) |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows.values():
        lines.append(f"| {r['model']}{' *' if r.get('kept') else ''} | {r['test_accuracy']:.4f} "
                     f"| {fmt(r['sparsity'], '.4f')} | {fmt(r['params'], ',')} "
                     f"| {r['epochs']} | {fmt(r['train_seconds'], '.1f')} | {fmt(r['full_test_max_rel'], '.1e')} "
                     f"| {fmt(r['full_test_argmax'], '.4f')} |")
    if seeds:
        lines += ["", "## Seeds (S-KAN vs FastKAN, default recipes; test accuracy)", "",
                  "| model | " + " | ".join(f"seed {k}" for k in sorted({k for v in seeds.values() for k in v})) + " |",
                  "| --- |" + " --- |" * len({k for v in seeds.values() for k in v})]
        lines += [f"| {n} | " + " | ".join(f"{v:.4f}" for _, v in sorted(a.items())) + " |" for n, a in seeds.items()]
    lines += ["", "## Checks", "", "| claim | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['claim']} | {'met' if c['ok'] else 'NOT met'} | {c['detail']} |" for c in cks]
    for name in (n for n in SKANS if n in rows):
        x = rows[name]["extra"]
        lines += ["", f"## {name} phases (pool {', '.join(rows[name]['recipe']['pool'])})", "",
                  (f"- gate temperature {rows[name]['recipe'].get('tau_start')} -> "
                   f"{rows[name]['recipe'].get('tau_end')} over the full-pool phase; mean largest gate at its end: "
                   f"{fmt(x.get('gate_confidence'), '.4f')}"),
                  (f"- full pool (all {len(rows[name]['recipe']['pool'])} bases, "
                   f"{fmt(x.get('params_full_pool'), ',')} params): "
                  f"{fmt(x.get('full_pool_accuracy'), '.4f')}"),
                  (f"- after selection ({rows[name]['recipe'].get('selection')}, "
                   f"{fmt(x.get('select_seconds'), '.1f')} s), before fine-tuning: "
                   f"{fmt(x.get('selected_untuned_accuracy'), '.4f')} (held-out training slice: "
                   f"{fmt(x.get('holdout_accuracy_full_pool'), '.4f')} full pool -> "
                   f"{fmt(x.get('holdout_accuracy_selected'), '.4f')} selected; the gates learned on this slice, so "
                   "it shows what selection lost, not an unbiased accuracy)"),
                  f"- after pruning + fine-tuning (deployed): {rows[name]['test_accuracy']:.4f}",
                  f"- chosen bases per layer: {x.get('choices')}",
                  (f"- epochs: {rows[name]['epochs']} (full pool + pruned fine-tuning) vs "
                   f"{', '.join(str(rows[n]['epochs']) for n in SINGLE_BASIS if n in rows)} for the single-basis "
                   "KANs' default recipes; kan-fast-long is FastKAN trained for the same total epochs "
                   "(the full-pool epochs cost more per step than single-basis ones)")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": list(rows.values()), "seeds": seeds, "checks": cks},
                                                   indent=2, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="rerun only these entries; keep the others' rows")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0], help="seeds for the S-KAN vs FastKAN comparison")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    cache = Cache(args.cache_dir or default_cache_root())
    todo = list(NAMES) if args.only is None else args.only
    old: dict[str, Any] = {"rows": [], "seeds": {}}
    if args.only is not None and args.out.with_suffix(".json").is_file():
        old = json.loads(args.out.with_suffix(".json").read_text())
    kept = {r["model"]: {**r, "kept": True} for r in old["rows"] if r["model"] not in todo}
    seeds: dict[str, dict[str, float]] = {n: a for n, a in old.get("seeds", {}).items() if n not in todo}
    rows: dict[str, dict[str, Any]] = {}

    def ordered() -> dict[str, dict[str, Any]]:
        both = {**kept, **rows}
        return {n: both[n] for n in [*NAMES, *both] if n in both}

    for name in todo:
        rows[name] = run_entry(name, cache)
        r = rows[name]
        print(f"{name}: acc {r['test_accuracy']:.4f} train {r['train_seconds']} s "
              f"(cache {'hit' if r['cache_hit'] else 'miss'})", flush=True)
        write(ordered(), seeds, args.out)  # partial results survive an interrupted run
    for name in (n for n in SEEDED if n in todo and len(args.seeds) > 1):
        seeds[name] = {str(s): rows[name]["test_accuracy"] if s == 0 else seed_accuracy(name, cache, s)
                       for s in args.seeds}
        print(f"{name}: seeds {seeds[name]}", flush=True)
        write(ordered(), seeds, args.out)
    write(ordered(), seeds, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
