"""nm: N:M structured sparsity (default 2:4) along the reduction dimension, for TensorRT sparse tensor cores.

In every run of M consecutive weights along the input (reduction) dimension of each output, the N largest
magnitudes are kept. The pattern is verified after the pass; a violation raises instead of shipping a model
TensorRT would silently run densely. ONNX Runtime has no N:M kernel, so on ort the measured ratio is ~1 and
``only_if_faster`` keeps layers dense there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from toolchain.core.errors import GateFailure
from toolchain.passes import PassContext, PassResult
from toolchain.passes._graph import copy_model, get_weight, require_layers, select, set_weight
from toolchain.passes._speed import check_target, measure_into
from toolchain.passes.prune import layer_pair


@dataclass(frozen=True)
class Config:
    n: int = 2
    m: int = 4
    layers: tuple[str, ...] = ()
    measure: bool = False
    only_if_faster: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise ValueError(f"need 0 < n < m, got {self.n}:{self.m}")


def apply_nm(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive rows (the reduction dim of an [in, out] weight)."""
    k, o = w.shape
    blocks = w.reshape(k // m, m, o)
    order = np.argsort(-np.abs(blocks), axis=1, kind="stable")
    keep = np.zeros_like(blocks, dtype=bool)
    np.put_along_axis(keep, order[:, :n, :], True, axis=1)
    return np.where(keep, blocks, 0.0).reshape(k, o).astype(np.float32)


def verify_nm(w: np.ndarray, n: int, m: int) -> int:
    """Number of M-blocks with more than N nonzeros (0 = the pattern holds)."""
    k, o = w.shape
    return int((np.count_nonzero(w.reshape(k // m, m, o), axis=1) > n).sum())


def run(model: onnx.ModelProto, cfg: Config, ctx: PassContext | None = None) -> PassResult:
    ctx = ctx or PassContext()
    check_target(ctx.target, cfg.measure, cfg.only_if_faster, "nm")
    out = copy_model(model)
    rows: list[dict[str, Any]] = []
    changed = False
    for ly in select(require_layers(out, "nm"), cfg.layers):
        w = get_weight(out, ly)
        row: dict[str, Any] = {"layer": ly.name, "shape": list(w.shape), "pattern": f"{cfg.n}:{cfg.m}",
                               "density_before": round(float(np.count_nonzero(w)) / w.size, 4)}
        if w.shape[0] % cfg.m:
            row.update(applied=False, density=row["density_before"],
                       why=f"reduction dim {w.shape[0]} is not a multiple of {cfg.m}")
            rows.append(row)
            continue
        sw = apply_nm(w, cfg.n, cfg.m)
        bad = verify_nm(sw, cfg.n, cfg.m)
        if bad:
            raise GateFailure(f"pass nm: {bad} blocks of layer {ly.name} violate {cfg.n}:{cfg.m} after pruning; "
                              "this is an edgec bug, report it")
        row["density"] = round(float(np.count_nonzero(sw)) / w.size, 4)
        keep_dense = measure_into(row, *layer_pair(w, sw), w.shape[0], cfg, ctx)
        if keep_dense:
            row.update(applied=False, density=row["density_before"],
                       why=f"no N:M kernel on {ctx.target} (ratio {row['speedup']}); kept dense")
        else:
            set_weight(out, ly, sw)
            row.update(applied=True, verified=True)
            changed = True
        rows.append(row)
    note = ("ONNX Runtime has no N:M sparse kernel: no speed-up on ort; TensorRT uses it with the "
            "SPARSE_WEIGHTS builder flag on Ampere+ GPUs") if ctx.target == "ort" else \
        f"per-layer speed on {ctx.target} not measured in-process"
    return PassResult(out, changed, {"layers": rows, "target": ctx.target, "note": note})
