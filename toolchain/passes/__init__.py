"""Graph passes: each file holds a frozen config dataclass and a pure function on an ONNX model.

``REGISTRY`` is one explicit dict: name -> PassSpec(config class, function). The CLI syntax is
``--pass NAME[=key=value,key=value]``; values are parsed by the config field's type.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_type_hints

import onnx

from toolchain.core.errors import UsageError

if TYPE_CHECKING:
    from toolchain.core.cache import Cache
    from toolchain.core.profile import Profile
    from toolchain.zoo.datasets import Dataset


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassContext:
    """What a pass may need beyond the model: the profile, calibration data, the cache."""

    profile: Profile | None = None
    cache: Cache | None = None
    data: Dataset | None = None  # labelled, for calibration / accuracy control
    target: str = "ort"  # passes may choose forms for, or measure speed on, this target


@dataclass(frozen=True)
class PassSpec:
    name: str
    module: str  # module defining CONFIG (dataclass type) and run(model, cfg, ctx) -> PassResult
    summary: str
    version: int = 1
    measurable: bool = False  # its Config has ``only_if_faster``: keep a rewrite only where measured faster

    def needs_data(self, cfg: Any) -> bool:
        """Whether this configuration calibrates or controls accuracy on a labelled set."""
        return bool(getattr(cfg, "needs_data", False))

    def config_class(self) -> type:
        return importlib.import_module(self.module).Config

    def fn(self) -> Callable[[onnx.ModelProto, Any, PassContext], PassResult]:
        return importlib.import_module(self.module).run


REGISTRY: dict[str, PassSpec] = {
    "cleanup": PassSpec("cleanup", "toolchain.passes.cleanup",
                        "constant folding, dead-node removal, shape inference, fusion-friendly rewrites"),
    "prune": PassSpec("prune", "toolchain.passes.prune",
                      "unstructured magnitude pruning to a density (global or per layer); no speed-up on ort",
                      measurable=True),
    "nm": PassSpec("nm", "toolchain.passes.nm", "N:M (default 2:4) sparsity along the reduction dim, verified",
                   measurable=True),
    "structured": PassSpec("structured", "toolchain.passes.structured",
                           "neuron pruning that slices consecutive MatMul/Gemm weights (smaller, faster)",
                           measurable=True),
    "modular": PassSpec("modular", "toolchain.passes.modular",
                        "lower block-sparse (G2GNet) MatMuls to gather + grouped matmul", measurable=True),
    "int8": PassSpec("int8", "toolchain.passes.int8",
                     "INT8 dynamic or static QDQ (per-channel, calibrated on real data) via onnxruntime.quantization",
                     version=3),  # 2: static int8 for tvm in integer form; 3: symmetric Q/DQ for tensorrt
    "int8-auto": PassSpec("int8-auto", "toolchain.passes.int8_auto",
                          "accuracy-controlled INT8: sensitive layers stay fp32 until the drop <= max_drop"),
    "fp16": PassSpec("fp16", "toolchain.passes.fp16", "float16 conversion with an op block-list; fp32 I/O"),
    "bf16": PassSpec("bf16", "toolchain.passes.bf16", "bfloat16 conversion with an op block-list (tvm/tensorrt)"),
}


def _parse_value(raw: str, typ: Any, name: str, key: str) -> Any:
    origin = getattr(typ, "__origin__", None)
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if origin is tuple:
            return tuple(v for v in raw.split("+") if v)
        if typ is str or typ == "str":
            return raw
        # Optional[X]
        args = [a for a in getattr(typ, "__args__", ()) if a is not type(None)]
        if args:
            return None if raw.lower() == "none" else _parse_value(raw, args[0], name, key)
    except ValueError:
        raise UsageError(f"pass {name}: {key}={raw!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    return raw


def parse_pass(text: str) -> tuple[PassSpec, Any]:
    """``NAME[=k=v,k=v]`` -> (spec, frozen config). Tuple values are joined with '+'."""
    name, _, rest = text.partition("=")
    name = name.strip()
    if name not in REGISTRY:
        raise UsageError(f"unknown pass {name!r}; available: {', '.join(sorted(REGISTRY))} (see 'edgec passes')")
    spec = REGISTRY[name]
    cls = spec.config_class()
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise UsageError(f"pass {name}: option {item!r} must be key=value")
        if key not in hints:
            raise UsageError(f"pass {name}: unknown option {key!r}; valid: {', '.join(hints)}")
        kwargs[key] = _parse_value(raw, hints[key], name, key)
    try:
        cfg = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"pass {name}: {e}") from None
    return spec, cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
