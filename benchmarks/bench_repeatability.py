"""Repeatability of `edgec bench`: two back-to-back benches of the same artifact per zoo family.

For each family in the zoo, its first (smallest) entry is exported, cleaned up and compiled for the
profile's targets; then the same artifact is benchmarked twice in a row (fresh measurements, not
cached) and the two p50 confidence intervals are compared. Writes benchmarks/results/repeatability.md and .json.

    nice python -m benchmarks.bench_repeatability [--profile x86-avx512] [--targets ort] [--weights untrained]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from benchmarks._common import command_line, write_results
from toolchain import api
from toolchain.core.cache import Artifact, Cache
from toolchain.core.profile import load_profile
from toolchain.core.text import markdown_table
from toolchain.core.versions import environment
from toolchain.export import export_module
from toolchain.measure.stats import ci_overlap, require_comparable
from toolchain.zoo.datasets import load_dataset
from toolchain.zoo.registry import entries, get_entry

HEADER = ["family", "model", "pass", "target", "profile", "run 1 p50 [95% CI] / p90 (us)",
          "run 2 p50 [95% CI] / p90 (us)", "p50 ratio 2/1", "CIs overlap", "stable, reruns"]


def export_untrained(name: str, cache: Cache, data_dir: Path | None = None) -> tuple[Artifact, bool]:
    """The zoo entry's module with its initial (seeded, untrained) weights, exported like a trained one:
    same graph structure and op count, so the same latency behaviour, without minutes of training."""
    import torch

    entry = get_entry(name)
    torch.manual_seed(0)
    module = entry.build(entry.recipe).eval()
    form = entry.forms[0]
    exp_mod = entry.export_module(module, form) if entry.export_module else module
    data = load_dataset(entry.dataset, data_dir)
    check = data.x_test[:256].reshape(-1, *entry.input_shape[1:])
    example = None
    if entry.example_inputs is not None:
        example = entry.example_inputs(module, form, torch.from_numpy(check[:1]))
        if len(example) > 1:
            check = tuple(t.numpy() for t in entry.example_inputs(module, form, torch.from_numpy(check)))
    key = hashlib.sha256(f"untrained:{name}:{sorted(entry.recipe.items())}".encode()).hexdigest()
    return export_module(exp_mod, entry.input_shape, cache, key, check_inputs=check, form=form, example=example,
                         extra_meta={"zoo": name, "family": entry.family, "dataset": entry.dataset, "untrained": True})


def us(v: float) -> str:
    return f"{v * 1000:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="x86-avx512")
    ap.add_argument("--targets", default="ort", help="comma-separated")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--weights", choices=("trained", "untrained"), default="trained",
                    help="untrained: skip training (latency repeatability does not depend on weight values)")
    ap.add_argument("--data-dir", type=Path, default=None, help="Planetoid raw files for the GNN-distilled family")
    ap.add_argument("--write-onnx", type=Path, default=None, help="also save each family's cleaned ONNX here")
    ap.add_argument("--name", default="repeatability", help="results/<name>.md|json")
    args = ap.parse_args()
    cache = Cache(args.cache_dir)
    prof = load_profile(args.profile)
    families: dict[str, list[str]] = {}
    for name, e in entries().items():
        families.setdefault(e.family, []).append(name)
    rows, ok, total = [], 0, 0
    latencies: dict[str, dict[str, object]] = {}
    t0 = time.monotonic()
    for family, names in families.items():
        src, name, why = None, names[0], ""
        for name in names:  # the family's first entry that deploys (GNN teachers do not, for one)
            try:
                src, _ = (api.export(name, cache=cache, data_dir=args.data_dir, progress=False)
                          if args.weights == "trained" else export_untrained(name, cache, args.data_dir))
                break
            except Exception as e:  # noqa: BLE001 -- the next entry of the family may deploy
                why = str(e)
                print(f"{name}: {e}", file=sys.stderr)
        if src is None:
            rows.append([family, name, "-", "-", prof.id, "-", "-", "-", "-", f"no deployable entry: {why[:80]}"])
            continue
        for target in args.targets.split(","):
            try:
                final, _ = api.optimize(src, ["cleanup"], cache=cache, profile=prof, target=target)
                if args.write_onnx:
                    args.write_onnx.mkdir(parents=True, exist_ok=True)
                    (args.write_onnx / f"{name}.onnx").write_bytes(final.payload.read_bytes())
                comp, _ = api.compile(final, profile=prof, target=target, cache=cache)
                r1 = api.bench(comp, cache=cache, profile=prof, data_dir=args.data_dir, reference=src)
                r2 = api.bench(comp, cache=cache, profile=prof, data_dir=args.data_dir, reference=src)  # back to back
            except Exception as e:  # noqa: BLE001 -- report it as a row, keep going
                rows.append([family, name, "cleanup", target, prof.id, "-", "-", "-", "-", f"error: {str(e)[:80]}"])
                print(f"{name} {target}: {e}", file=sys.stderr)
                continue
            require_comparable(r1, r2)
            a, b = r1["latency"]["ci"]["p50_ms"], r2["latency"]["ci"]["p50_ms"]
            overlap = ci_overlap(a, b)
            total += 1
            ok += overlap
            l1, l2 = r1["latency"], r2["latency"]
            latencies[f"{name}/{target}"] = {"run1": l1, "run2": l2}
            rows.append([family, name, "cleanup", target, prof.id,
                         f"{us(l1['p50_ms'])} [{us(a[0])}, {us(a[1])}] / p90 {us(l1['p90_ms'])}",
                         f"{us(l2['p50_ms'])} [{us(b[0])}, {us(b[1])}] / p90 {us(l2['p90_ms'])}",
                         f"{l2['p50_ms'] / l1['p50_ms']:.3f}", "yes" if overlap else "**no**",
                         f"{l1['stable']}/{l2['stable']}, reruns {int(bool(l1['rerun']))}/{int(bool(l2['rerun']))}"])
            print(rows[-1], flush=True)
    env = environment()
    command = command_line("benchmarks.bench_repeatability")
    md = [
        "## Repeatability: two back-to-back `edgec bench` runs per zoo family (`benchmarks/bench_repeatability.py`)",
        "",
        f"`{command}`" + (" (weights: each family's seeded initial weights; latency repeatability does not "
                          "depend on weight values, accuracy is not the point here)"
                          if args.weights == "untrained" else ""),
        (f"Date {env['date']}, CPU {env['cpu']}, governor {env['governor']}, "
         f"onnxruntime {env['versions'].get('onnxruntime')}, apache-tvm {env['versions'].get('apache-tvm')}; "
         f"the machine was shared with other jobs (noisy). Wall {time.monotonic() - t0:.0f} s."), "",
        ("Each bench: steady-state warm-up per round, 6 rounds with a freshly loaded runner spread over ~3 s, "
         "p50 95 % CI from a two-level bootstrap (rounds x time blocks) hulled with a Student-t interval on "
         "per-round p50s. Latencies in microseconds, batch 1, 1 thread."), "",
        markdown_table(HEADER, rows),
        "", f"**{ok} of {total} families: the two p50 confidence intervals overlap.**",
    ]
    out = write_results(args.name, md, {"command": command, "profile": args.profile, "targets": args.targets,
                                        "weights": args.weights, "overlap": ok, "compared": total,
                                        "rows": [dict(zip(HEADER, r, strict=True)) for r in rows],
                                        "latency": latencies})
    print(f"wrote {out}: {ok}/{total} overlap")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
