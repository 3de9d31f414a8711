"""int8-auto: accuracy-controlled INT8. Quantize every weight layer, and while the accuracy drop on the
labelled set exceeds ``max_drop`` points, put the most sensitive layers back in fp32.

Sensitivity of a layer = accuracy drop (points) when only that layer is int8. Layers go back to fp32 in
decreasing sensitivity until the drop is within bound. Everything runs under ``time_budget_s``; when the
budget ends, the best model found so far is returned (within bound if any was, else the smallest drop),
always with a per-layer report (sensitivity, precision chosen, why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import onnx

from toolchain.passes import PassContext, PassResult
from toolchain.passes._graph import copy_model
from toolchain.passes._quant import (
    accuracy,
    calibration_ranges,
    candidates,
    check_weight_ops,
    name_nodes,
    require_data,
    weight_bits_report,
)
from toolchain.passes.int8 import prepare, quantize, reduce_range_for


@dataclass(frozen=True)
class Config:
    max_drop: float = 1.0  # accuracy points
    mode: str = "dynamic"  # dynamic | static
    per_channel: bool = True
    time_budget_s: float = 300.0
    eval_samples: int = 0  # test samples for the accuracy check (0 = all)
    calib_samples: int = 512
    keep_fp32: tuple[str, ...] = ()
    family_defaults: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static"):
            raise ValueError(f"mode must be dynamic or static, got {self.mode!r}")
        if self.max_drop < 0:
            raise ValueError("max_drop must be >= 0")

    @property
    def needs_data(self) -> bool:
        return True


def run(model: onnx.ModelProto, cfg: Config, ctx: PassContext | None = None) -> PassResult:
    ctx = ctx or PassContext()
    t0 = time.monotonic()
    check_weight_ops(model, "int8-auto")
    require_data(ctx.data, "int8-auto")
    ds = ctx.data
    n = len(ds.x_test) if cfg.eval_samples <= 0 else min(cfg.eval_samples, len(ds.x_test))
    x, y = ds.x_test[:n], ds.y_test[:n]
    nodes, kept = candidates(name_nodes(copy_model(model)), cfg.family_defaults, cfg.keep_fp32)
    calib = calibration_ranges(model, ds, ctx.cache, cfg.calib_samples, "minmax") if cfg.mode == "static" else None
    prep = prepare(model, cfg.mode, nodes)
    rr = reduce_range_for(ctx)
    base = accuracy(model, x, y)

    def q(sel: list[str]) -> tuple[onnx.ModelProto, float]:
        m = quantize(prep, cfg.mode, sel, cfg.per_channel, rr, calib)
        return m, (base - accuracy(m, x, y)) * 100.0  # the bound is in accuracy points

    def over_budget() -> bool:
        return time.monotonic() - t0 > cfg.time_budget_s

    tried: list[tuple[list[str], onnx.ModelProto, float]] = []
    full, drop = q(nodes)
    tried.append((list(nodes), full, drop))
    sens: dict[str, float] = {}
    steps = 1
    if drop > cfg.max_drop:
        for name in nodes:  # sensitivity: only this layer in int8
            if over_budget():
                break
            sens[name] = q([name])[1]
            steps += 1
        # Unmeasured layers (budget ran out) rank after measured ones, in graph order.
        order = sorted(nodes, key=lambda k: (k not in sens, -sens.get(k, 0.0)))
        sel = list(nodes)
        for name in order:
            if over_budget():
                break
            sel.remove(name)
            m, d = q(sel)
            steps += 1
            tried.append((list(sel), m, d))
            if d <= cfg.max_drop:
                break
    within = [t for t in tried if t[2] <= cfg.max_drop]
    if within:
        best = max(within, key=lambda t: (len(t[0]), -t[2]))  # most layers in int8, then smallest drop
    elif over_budget() or not nodes:
        best = min(tried, key=lambda t: t[2])
    else:  # every layer back in fp32 and still over: only possible with max_drop < 0 noise; ship fp32
        best = ([], copy_model(model), 0.0)
    sel, out, drop = best
    layers: list[dict[str, Any]] = []
    for name in nodes:
        row: dict[str, Any] = {"layer": name, "precision": "int8" if name in sel else "fp32"}
        if name in sens:
            row["sensitivity_points"] = round(sens[name], 3)
        if name not in sel:
            row["why"] = "most sensitive: kept fp32 to hold the accuracy bound"
        layers.append(row)
    layers += [{"layer": k, "precision": "fp32", "why": why} for k, why in kept.items()]
    report = {
        "mode": cfg.mode, "max_drop": cfg.max_drop, "dataset": ds.name, "eval_samples": int(n),
        "accuracy_fp32": round(base, 5), "accuracy": round(base - drop / 100.0, 5), "drop_points": round(drop, 3),
        "within_bound": drop <= cfg.max_drop, "int8_layers": len(sel), "layers": layers, "evaluations": steps,
        "budget_exhausted": over_budget(), "seconds": round(time.monotonic() - t0, 2),
        "weight_bytes": weight_bits_report(out),
    }
    return PassResult(out, bool(sel), report)



