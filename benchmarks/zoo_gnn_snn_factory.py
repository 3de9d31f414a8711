"""Train the GNN-to-MLP, spiking and NN-Factory zoo entries with their DEFAULT recipes (through the
weights cache), export every deployable form with the parity gate, build one model per family through
``edgec build`` (ORT target), and write benchmarks/results/zoo/zoo_gnn_snn_factory.{md,json}.

    nice .venv/bin/python -m benchmarks.zoo_gnn_snn_factory --data-dir ../shared/data/planetoid
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from toolchain import api
from toolchain.core.cache import Cache
from toolchain.export import export_model
from toolchain.zoo import TrainContext, gnn_mlp, spiking
from toolchain.zoo import nnfactory as nf
from toolchain.zoo.datasets import load_dataset
from toolchain.zoo.trained import load_trained
from toolchain.zoo.training import evaluate, train_classifier

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results" / "zoo" / "zoo_gnn_snn_factory"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def gnn_rows(cache: Cache, data_dir: Path) -> list[dict[str, Any]]:
    by_name = {e.name: e for e in gnn_mlp.ENTRIES}
    rows = []
    for ds in ("cora", "citeseer"):
        for kind in ("gcn", "sage", "mlp", "glnn", "ffg2m"):
            e = by_name[f"{kind}-{ds}"]
            t0 = time.monotonic()
            _m, metrics, _a, hit = load_trained(e, cache, data_dir, progress=False)
            row: dict[str, Any] = {"model": e.name, "dataset": ds, "test_accuracy": metrics["test_accuracy"],
                                   "train_seconds": metrics.get("train_seconds"), "cache_hit": hit,
                                   "wall_s": round(time.monotonic() - t0, 1)}
            if "teacher" not in e.tags:
                art, _ = export_model(e.name, cache, data_dir=data_dir, progress=False)
                row["parity"] = art.meta["parity"]
            rows.append(row)
            print(row, flush=True)
    return rows


def snn_rows(cache: Cache) -> list[dict[str, Any]]:
    rows = []
    for e in spiking.ENTRIES:
        _m, metrics, _a, hit = load_trained(e, cache, progress=False)
        row: dict[str, Any] = {"model": e.name, "T": e.recipe["steps"], "reset": e.recipe["reset"],
                               "test_accuracy": metrics["test_accuracy"],
                               "test_accuracy_pre_snap": metrics.get("test_accuracy_pre_snap"),
                               "train_seconds": metrics.get("train_seconds"), "cache_hit": hit, "parity": {}}
        for form in e.forms:
            art, _ = export_model(e.name, cache, form=form, progress=False)
            row["parity"][form] = art.meta["parity"]
        rows.append(row)
        print(row, flush=True)
    return rows


def factory_rows(cache: Cache) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    net, metrics, _a, hit = load_trained(nf.SUPERNET_ENTRY, cache, progress=False)
    supernet = {"test_accuracy": metrics["test_accuracy"], "train_seconds": metrics.get("train_seconds"),
                "cache_hit": hit, **{k: v for k, v in metrics.items() if k.startswith("test_accuracy_w")}}
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for tname, task in nf.TASKS.items():
        data = load_dataset("fashion-mnist:" + ",".join(map(str, task)))
        for s in nf.BUDGETS:
            t0 = time.perf_counter()
            gen = nf.assemble(task, s, net=net)
            gen_s = time.perf_counter() - t0
            acc = evaluate(gen, data.x_test, data.y_test)
            # Baseline: the same architecture (dense head), trained from scratch on the task only, for as
            # many epochs as the supernet saw the data.
            torch.manual_seed(0)
            base = nf.compact_module(784, gen[0].out_features, gen[2].out_features, len(task))
            bm = train_classifier(base, TrainContext(data=data, cache=cache, progress=False),
                                  epochs=nf.SUPERNET_RECIPE["epochs"], lr=2e-3, batch=128)
            nnz = sum(int((p != 0).sum()) for p in gen.parameters())
            rows.append({"task": tname, "classes": list(task), "sparsity": s, "generated_accuracy": acc,
                         "baseline_accuracy": bm["test_accuracy"], "gap_points": 100 * (acc - bm["test_accuracy"]),
                         "assemble_seconds": gen_s, "nonzero_params": nnz,
                         "baseline_params": sum(p.numel() for p in base.parameters()),
                         "widths": [gen[0].out_features, gen[2].out_features]})
            print(rows[-1], flush=True)
    torch.set_num_threads(threads)
    exports = []
    for e in nf.ENTRIES[1:]:
        _m, metrics, _a, _ = load_trained(e, cache, progress=False)
        art, _ = export_model(e.name, cache, progress=False)
        exports.append({"model": e.name, "test_accuracy": metrics["test_accuracy"], "parity": art.meta["parity"]})
    return supernet, rows, exports


def build_rows(cache: Cache, data_dir: Path) -> list[dict[str, Any]]:
    out = []
    for name in ("ffg2m-cora", "snn-mlp", "nnf-footwear-s50"):
        rep = api.build(name, "x86-avx512", ["ort"], [], cache, data_dir=data_dir, samples=1000, progress=False)
        ort = rep["targets"]["ort"]
        out.append({"model": name, "p50_ms": ort["latency"].get("p50_ms"), "p90_ms": ort["latency"].get("p90_ms"),
                    "accuracy": ort.get("accuracy"), "agreement": ort.get("agreement"),
                    "ops": rep["onnx"]["ops"]})
        print(out[-1], flush=True)
    return out


def render(res: dict[str, Any]) -> str:
    lines = ["# Zoo: GNN-to-MLP students, spiking MLP, NN-Factory", "",
             f"Command: `{res['command']}` ({res['wall_s']} s, default recipes, weights cache)", "",
             "## GNN teachers and MLP students (public split, test accuracy %)", "",
             "| dataset | GCN teacher | SAGE teacher | plain MLP | GLNN | FF-G2M | target (GCN/GLNN/FF-G2M) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    acc = {r["model"]: r["test_accuracy"] for r in res["gnn"]}
    for ds, tgt in (("cora", "80 / 75 / >= GLNN"), ("citeseer", "69 / 68 / >= GLNN")):
        lines.append(f"| {ds} | " + " | ".join(_pct(acc[f"{k}-{ds}"]) for k in ("gcn", "sage", "mlp", "glnn", "ffg2m"))
                     + f" | {tgt} |")
    lines += ["", "Student export parity (ONNX Runtime vs torch, 1000 test nodes):", "",
              "| model | max rel | argmax agreement |", "| --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['parity']['max_rel']:.1e} | {r['parity']['argmax_agreement']:.3f} |"
              for r in res["gnn"] if r.get("parity")]
    lines += ["", "## Spiking MLP (Fashion-MNIST, target 86 %, T <= 16)", "",
              ("| model | T | reset | test acc % | before weight snap % | unrolled parity (max abs) "
               "| step parity (max abs) |"),
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['T']} | {r['reset']} | {_pct(r['test_accuracy'])} | "
              f"{_pct(r['test_accuracy_pre_snap'])} | {r['parity']['unrolled']['max_abs']} | "
              f"{r['parity']['step']['max_abs']} |" for r in res["snn"]]
    sn = res["factory"]["supernet"]
    lines += ["", "## NN-Factory (Fashion-MNIST tasks; generated = assembled, no training)", "",
              f"Supernet test accuracy (10 classes, full width): {_pct(sn['test_accuracy'])} %.", "",
              ("| task | classes | sparsity | widths | non-zero params | generated acc % | baseline acc % (same size, "
               "trained on task) | gap (points) | assemble ms |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['task']} | {r['classes']} | {r['sparsity']} | {r['widths']} | {r['nonzero_params']} | "
              f"{_pct(r['generated_accuracy'])} | {_pct(r['baseline_accuracy'])} | {r['gap_points']:+.2f} | "
              f"{1000 * r['assemble_seconds']:.1f} |" for r in res["factory"]["rows"]]
    lines += ["", "Generated zoo entries exported: " + ", ".join(
        f"{r['model']} (acc {_pct(r['test_accuracy'])} %, max rel {r['parity']['max_rel']:.1e})"
        for r in res["factory"]["exports"])]
    lines += ["", "## `edgec build` (x86-avx512, ORT target; flow check, latencies informational)", "",
              "| model | p50 ms | p90 ms | ORT acc % (first 1000 test) | ORT vs export argmax agreement | ops |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['p50_ms']:.4f} | {r['p90_ms']:.4f} "
              f"| {_pct((r['accuracy'] or {}).get('task_accuracy'))} | "
              f"{(r['agreement'] or {}).get('argmax_agreement')} | "
              f"{', '.join(f'{k}:{v}' for k, v in sorted(r['ops'].items()))} |" for r in res["build"]]
    lines += ["", "## Default-recipe training time (seconds, as recorded when the weights were trained; budget 600)",
              "",
              "| model | train s | loaded from cache in this run |", "| --- | --- | --- |"]
    trained = [*res["gnn"], *res["snn"], {"model": "nnf-supernet", **sn}]
    lines += [f"| {r['model']} | {r.get('train_seconds')} | {r.get('cache_hit')} |" for r in trained]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "planetoid")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--skip", nargs="*", default=[], choices=["gnn", "snn", "factory", "build"])
    args = ap.parse_args()
    cache = Cache(args.cache_dir)  # students / generated models load their teacher / supernet from it too
    t0 = time.monotonic()
    res: dict[str, Any] = {"command": "nice .venv/bin/python -m benchmarks.zoo_gnn_snn_factory", "gnn": [], "snn": [],
                           "factory": {"supernet": {}, "rows": [], "exports": []}, "build": []}
    if "gnn" not in args.skip:
        res["gnn"] = gnn_rows(cache, args.data_dir)
    if "snn" not in args.skip:
        res["snn"] = snn_rows(cache)
    if "factory" not in args.skip:
        sn, rows, exports = factory_rows(cache)
        res["factory"] = {"supernet": sn, "rows": rows, "exports": exports}
    if "build" not in args.skip:
        res["build"] = build_rows(cache, args.data_dir)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    if not args.skip:
        args.out.with_suffix(".md").write_text(render(res))
    print(f"wrote {args.out.with_suffix('.json')}" + ("" if args.skip else f" and {args.out.with_suffix('.md')}"))


if __name__ == "__main__":
    main()
