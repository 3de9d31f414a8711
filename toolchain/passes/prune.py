"""prune: unstructured magnitude pruning of MatMul/Gemm weights to a target density (global or per layer).

Zeros inside a dense weight do not make ONNX Runtime's dense GEMM any faster; the report says so and, with
``measure``, shows the measured per-layer ratio. ``only_if_faster`` therefore keeps layers dense on ort
(pruning that does not pay costs accuracy for nothing). The payoff of this pass is compressibility and a
starting point for structured / N:M / modular passes and sparse-aware targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from toolchain.core.errors import UsageError
from toolchain.passes import PassContext, PassResult
from toolchain.passes._graph import copy_model, get_weight, require_layers, select, set_weight
from toolchain.passes._speed import check_target, measure_into, single_layer_model

ORT_NOTE = ("ONNX Runtime runs MatMul/Gemm densely: zeros in a dense weight give no speed-up on ort "
            "(use structured or modular passes for speed)")


@dataclass(frozen=True)
class Config:
    density: float = 0.5  # fraction of weights kept
    scope: str = "global"  # global | layer
    layers: tuple[str, ...] = ()  # node or weight names; empty = every dense layer
    measure: bool = False
    only_if_faster: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.scope not in ("global", "layer"):
            raise ValueError(f"scope must be global or layer, got {self.scope!r}")


def layer_pair(w_dense: np.ndarray, w_sparse: np.ndarray) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Single-layer models x @ W for the dense and the pruned weight (same op, different values)."""
    def one(w: np.ndarray) -> onnx.ModelProto:
        n = helper.make_node("MatMul", ["x", "W"], ["y"])
        return single_layer_model([n], [numpy_helper.from_array(w, "W")], "x", w.shape[0], "y")

    return one(w_dense), one(w_sparse)


def run(model: onnx.ModelProto, cfg: Config, ctx: PassContext | None = None) -> PassResult:
    ctx = ctx or PassContext()
    check_target(ctx.target, cfg.measure, cfg.only_if_faster, "prune")
    out = copy_model(model)
    layers = select(require_layers(out, "prune"), cfg.layers)
    weights = {ly.name: get_weight(out, ly) for ly in layers}
    if cfg.scope == "global":
        mags = np.concatenate([np.abs(w).ravel() for w in weights.values()])
        k = round(cfg.density * mags.size)
        thr = {n: (np.partition(mags, mags.size - k)[mags.size - k] if k > 0 else np.inf) for n in weights}
    else:
        thr = {}
        for n, w in weights.items():
            a = np.abs(w).ravel()
            k = round(cfg.density * a.size)
            thr[n] = np.partition(a, a.size - k)[a.size - k] if k > 0 else np.inf
    rows: list[dict[str, Any]] = []
    changed = False
    for ly in layers:
        w = weights[ly.name]
        pruned = np.where(np.abs(w) >= thr[ly.name], w, 0.0).astype(np.float32)
        row: dict[str, Any] = {"layer": ly.name, "shape": list(w.shape),
                               "density_before": round(float(np.count_nonzero(w)) / w.size, 4),
                               "density": round(float(np.count_nonzero(pruned)) / w.size, 4)}
        keep_dense = measure_into(row, *layer_pair(w, pruned), w.shape[0], cfg, ctx)
        if keep_dense:
            row["applied"] = False
            row["density"] = row["density_before"]
            row["why"] = f"sparse not faster on {ctx.target} (ratio {row['speedup']}); kept dense"
        else:
            set_weight(out, ly, pruned)
            row["applied"] = True
            changed = True
        rows.append(row)
    if not rows:
        raise UsageError("pass prune: no layer selected")
    report = {"layers": rows, "target": ctx.target, "note": ORT_NOTE if ctx.target == "ort" else
              f"per-layer speed on {ctx.target} not measured in-process"}
    return PassResult(out, changed, report)
