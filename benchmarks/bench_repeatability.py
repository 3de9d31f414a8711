"""Repeatability of `edgec bench`: two back-to-back benches of the same artifact per zoo family.

For each family in the zoo, its first (smallest) entry is exported, cleaned up and compiled for the
profile's targets; then the same artifact is benchmarked twice in a row (fresh measurements, not
cached) and the two p50 confidence intervals are compared. Writes benchmarks/results/repeatability.md.

    nice python benchmarks/bench_repeatability.py [--profile x86-avx512] [--targets ort] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from toolchain import api
from toolchain.cache import Cache
from toolchain.profile import load_profile
from toolchain.report import markdown_table, write_atomic
from toolchain.stats import ci_overlap, require_comparable
from toolchain.zoo.registry import entries


def us(v: float) -> str:
    return f"{v * 1000:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="x86-avx512")
    ap.add_argument("--targets", default="ort", help="comma-separated")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "repeatability.md")
    args = ap.parse_args()
    cache = Cache(args.cache_dir)
    prof = load_profile(args.profile)
    first: dict[str, str] = {}
    for name, e in entries().items():
        first.setdefault(e.family, name)
    rows, ok, total = [], 0, 0
    t0 = time.monotonic()
    for family, name in first.items():
        for target in args.targets.split(","):
            try:
                src, _ = api.export(name, cache, progress=False)
                final, _ = api.optimize(src, ["cleanup"], cache, prof, target=target)
                comp, _ = api.compile(final, prof, target, cache)
                r1 = api.bench(comp, cache, prof, reference=src)
                r2 = api.bench(comp, cache, prof, reference=src)  # back to back, same artifact
            except Exception as e:  # noqa: BLE001  (report, keep going)
                rows.append([family, name, "cleanup", target, prof.id, "-", "-", "-", "-", f"error: {str(e)[:80]}"])
                print(f"{name} {target}: {e}", file=sys.stderr)
                continue
            require_comparable(r1, r2)
            a, b = r1["latency"]["ci"]["p50_ms"], r2["latency"]["ci"]["p50_ms"]
            overlap = ci_overlap(a, b)
            total += 1
            ok += overlap
            l1, l2 = r1["latency"], r2["latency"]
            rows.append([family, name, "cleanup", target, prof.id,
                         f"{us(l1['p50_ms'])} [{us(a[0])}, {us(a[1])}] / p90 {us(l1['p90_ms'])}",
                         f"{us(l2['p50_ms'])} [{us(b[0])}, {us(b[1])}] / p90 {us(l2['p90_ms'])}",
                         f"{l2['p50_ms'] / l1['p50_ms']:.3f}", "yes" if overlap else "**no**",
                         f"{l1['stable']}/{l2['stable']}, reruns {int(bool(l1['rerun']))}/{int(bool(l2['rerun']))}"])
            print(rows[-1], flush=True)
    env = api.environment()
    md = [
        "# Repeatability: two back-to-back `edgec bench` runs per zoo family", "",
        f"Command: `nice python benchmarks/bench_repeatability.py --profile {args.profile} --targets {args.targets}`",
        f"Date {env['date']}, CPU {env['cpu']}, governor {env['governor']}, "
        f"onnxruntime {env['versions'].get('onnxruntime')}, apache-tvm {env['versions'].get('apache-tvm')}; "
        f"the machine was shared with other jobs (noisy). Wall {time.monotonic() - t0:.0f} s.", "",
        "Each bench: steady-state warm-up per round, 6 rounds with a freshly loaded runner spread over ~3 s, "
        "p50 95 % CI from a two-level bootstrap (rounds x time blocks) hulled with a Student-t interval on "
        "per-round p50s. Latencies in microseconds, batch 1, 1 thread.", "",
        markdown_table(["family", "model", "pass", "target", "profile", "run 1 p50 [95% CI] / p90 (us)",
                        "run 2 p50 [95% CI] / p90 (us)", "p50 ratio 2/1", "CIs overlap", "stable, reruns"], rows),
        "", f"**{ok} of {total} families: the two p50 confidence intervals overlap.**", "",
    ]
    write_atomic(args.out, "\n".join(md))
    print(f"wrote {args.out}: {ok}/{total} overlap")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
