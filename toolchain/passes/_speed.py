"""Per-layer speed measurement on the chosen target, for sparsity passes' reports and ``only_if_faster``.

Each layer is cut out as a standalone ONNX model (its original form and its rewritten form), both run on
ONNX Runtime in this process with the profile's thread count, timed in interleaved rounds at batch 1, and
compared by p50 ratio. Only ``ort`` is measured in-process; other targets say so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from toolchain.core.errors import UsageError
from toolchain.core.onnx_io import ort_session
from toolchain.measure.timing import MeasureConfig, measure_interleaved

# A sparse form must beat dense by this margin to be kept under only_if_faster: per-layer timings on a
# shared machine wobble by a few percent, and a tie is not worth the accuracy risk.
MIN_GAIN = 1.05


@dataclass(frozen=True)
class Timing:
    dense_us: float
    sparse_us: float

    @property
    def speedup(self) -> float:
        return self.dense_us / self.sparse_us

    def to_json(self) -> dict[str, float]:
        return {"dense_p50_us": round(self.dense_us, 2), "sparse_p50_us": round(self.sparse_us, 2),
                "speedup": round(self.speedup, 3)}


def check_target(target: str, measure: bool, only_if_faster: bool, pass_name: str) -> None:
    if (measure or only_if_faster) and target != "ort":
        raise UsageError(f"pass {pass_name}: per-layer speed is measured in-process on ort only, not {target!r}; "
                         "use target ort for measure/only_if_faster, or set measure=false,only_if_faster=false")


def single_layer_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], in_name: str, in_dim: int,
                       out_name: str, opset: int = 18) -> onnx.ModelProto:
    """A standalone model of one layer: input ``[1, in_dim]`` float, one float output."""
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info(in_name, onnx.TensorProto.FLOAT, [1, in_dim])],
                          [helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


class _Sess:
    """A single-layer model on ONNX Runtime, as a runner (a context manager with ``infer``)."""

    def __init__(self, model: onnx.ModelProto, threads: int) -> None:
        self.sess = ort_session(model, threads)
        self.outs = [o.name for o in self.sess.get_outputs()]

    def __enter__(self) -> _Sess:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(self.outs, feed)


def time_pair(dense: onnx.ModelProto, sparse: onnx.ModelProto, in_name: str, in_dim: int, threads: int = 1,
              duration_s: float = 0.4) -> Timing:
    """p50 of both single-layer models at batch 1, interleaved so machine noise hits both alike."""

    feed = {in_name: np.random.default_rng(0).standard_normal((1, in_dim)).astype(np.float32)}
    sessions = {"dense": _Sess(dense, threads), "sparse": _Sess(sparse, threads)}
    cfg = MeasureConfig(duration_s=duration_s, min_runs=100, rounds=6, round_gap_s=0.0, warmup_max_s=0.3,
                        threads=threads, rerun_unstable=False)
    st = measure_interleaved({k: (lambda s=s: s, feed) for k, s in sessions.items()}, cfg)
    return Timing(st["dense"].p50_ms * 1000, st["sparse"].p50_ms * 1000)


def threads_of(ctx: Any) -> int:
    prof = getattr(ctx, "profile", None)
    return int(prof.bench.threads) if prof is not None else 1


def measure_into(row: dict[str, Any], dense: onnx.ModelProto, sparse: onnx.ModelProto, in_dim: int, cfg: Any,
                 ctx: Any) -> bool:
    """When ``cfg.measure`` or ``cfg.only_if_faster``: time the layer dense vs sparse on ``ctx.target`` into
    ``row``. Returns True when ``only_if_faster`` says the layer must stay dense."""
    if not (cfg.measure or cfg.only_if_faster):
        return False
    t = time_pair(dense, sparse, "x", in_dim, threads_of(ctx))
    row["measured_on"] = ctx.target
    row.update(t.to_json())
    return bool(cfg.only_if_faster and t.speedup < MIN_GAIN)
