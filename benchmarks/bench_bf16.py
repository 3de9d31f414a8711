"""bf16 vs fp32 on TVM for dense MLPs of growing weight size -> benchmarks/results/bf16.md and bf16.json.

    nice python -m benchmarks.bench_bf16 [--duration 1.0] [--models mlp-1m-like ...]

Each MLP (seeded random weights) is built for the profile twice: as it is (fp32: packed GEMV / chain
kernels) and after the bf16 pass for the tvm target (weight-only form: the dense weights stored as bf16,
``gemv-packed-bf16w`` / ``gemv-chain-bf16w``, fp32 accumulation). Both libraries are timed interleaved at
batch 1 with the profile's threads; the table gives the weight bytes the library holds and the largest
output difference over the fp32 build's output scale.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np
import onnx

from benchmarks._common import (
    PROFILE,
    Table,
    command_line,
    feed_for,
    infer_once,
    kernel_summary,
    measure,
    profile,
    table_section,
    tvm_build,
    us,
    write_results,
)
from kernels.tvm.testing import dense_onnx
from toolchain.passes import PassContext
from toolchain.passes.bf16 import Config as Bf16Config
from toolchain.passes.bf16 import run as bf16_pass

MODELS = {  # name -> layer widths
    "mlp-small-like": (784, 256, 256, 10),
    "mlp-1m-like": (784, 1024, 512, 256, 10),
    "mlp-3m-like": (1024, 1024, 1024, 1024, 10),
}
HEADER = ["model", "params", "fp32 p50 (us)", "bf16 p50 (us)", "bf16 / fp32", "weight MB fp32 -> bf16",
          "max abs diff / scale", "fp32 kernels", "bf16 kernels"]


def mlp(widths: tuple[int, ...]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32) for a, b in itertools.pairwise(widths)]
    return dense_onnx(ws, [(rng.standard_normal(w.shape[1]) * 0.1).astype(np.float32) for w in ws])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_bf16")
    ap.add_argument("--duration", type=float, default=1.0, help="timed seconds per candidate")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), help="which MLPs")
    a = ap.parse_args(argv)
    prof = profile()
    table = Table(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in a.models:
            widths = MODELS[name]
            model = mlp(widths)
            half = bf16_pass(model, Bf16Config(), PassContext(target="tvm"))
            paths = {"fp32": work / f"{name}.onnx", "bf16": work / f"{name}.bf16.onnx"}
            onnx.save(model, paths["fp32"])
            onnx.save(half.model, paths["bf16"])
            builds = {tag: tvm_build(p, prof, work, tag) for tag, p in paths.items()}
            feed = feed_for(paths["fp32"])
            lat = measure({tag: (factory, feed) for tag, (factory, _meta) in builds.items()}, a.duration, prof)
            ref = infer_once(builds["fp32"][0], feed)[0]
            diff = float(np.abs(infer_once(builds["bf16"][0], feed)[0] - ref).max() / np.abs(ref).max())
            params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
            mb = (half.report["initializer_bytes_fp32"] / 1e6, half.report["initializer_bytes"] / 1e6)
            table.add([name, f"{params / 1e6:.2f} M", us(lat["fp32"].p50_ms), us(lat["bf16"].p50_ms),
                       f"{lat['bf16'].p50_ms / lat['fp32'].p50_ms:.2f}x", f"{mb[0]:.2f} -> {mb[1]:.2f}",
                       f"{diff:.1e}", kernel_summary(builds["fp32"][1]["kernels"]),
                       kernel_summary(builds["bf16"][1]["kernels"])],
                      fp32=lat["fp32"], bf16=lat["bf16"], diff=diff)
    cmd = command_line("benchmarks.bench_bf16", argv)
    md = table_section("bf16 vs fp32 on TVM (dense MLPs)", cmd,
                       f"Profile {PROFILE}, batch 1, {prof.bench.threads} thread(s), interleaved, random weights.",
                       table, ["bf16: the bf16 pass's weight-only form (weights bf16 in memory, fp32 accumulation)."],
                       ["max abs diff / scale: largest abs(bf16 - fp32) output over the largest abs(fp32) output."])
    print(write_results("bf16", md, {"rows": table.to_json()}))


if __name__ == "__main__":
    main()
