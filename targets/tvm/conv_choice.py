"""Per conv layer, the hand-written direct kernel or MetaSchedule's tuned schedule: whichever measures faster.

A tuning run (targets.tvm.tuning) tunes the model's conv layers in their generic form next to the layers no
hand-written kernel covers, then measures each conv layer both ways and records the choice in the profile's
database (``kernel_choices.json``, see targets.tvm.database); the build leaves exactly the layers whose tuned
schedule won to the generic lowering and the database.

A layer is compared on its own: a one-layer ONNX model sliced from the source (the Conv with its bias, residual
Add and Relu, the same chain the direct kernel absorbs; its inputs become graph inputs), so its fused kernel is
the same workload MetaSchedule tunes in the whole model. Both builds run in this process on the Relax VM and are
timed interleaved (``toolchain.measure.timing.measure_interleaved``); the tuned schedule is kept only when its
median is below the hand-written kernel's and its output agrees with it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from kernels.tvm import KernelConfig
from kernels.tvm.passes import SubstituteConv
from targets.tvm.database import naive_kernels
from targets.tvm.frontend import import_onnx, tvm_target
from targets.tvm.pipeline import pipeline
from toolchain.core.onnx_io import fix_batch
from toolchain.core.profile import Profile
from toolchain.measure.timing import MeasureConfig, measure_interleaved

# One comparison: two small builds (a few seconds each on a busy machine) and the interleaved timing.
COMPARE_S = 12.0
MEASURE = MeasureConfig(duration_s=0.6, min_runs=20, warmup_window_s=0.02, warmup_max_s=0.5, rounds=4,
                        round_gap_s=0.0, rerun_unstable=False, keep_samples=0)


@dataclass(frozen=True)
class ConvLayer:
    """One distinct conv layer of a model: its key (``conv_layer_key``), work, and the layer alone as ONNX."""

    key: str
    mflops: float
    model: onnx.ModelProto


def _layer_chains(model: onnx.ModelProto) -> list[tuple[list[Any], list[str], str]]:
    """(nodes, input tensor names, output name) per Conv with a constant weight: the Conv, then while its output
    has one consumer, an Add of a constant (bias), one Add of another tensor (the residual), a Relu (last). A
    chain with a residual comes twice, the second time cut before the residual Add: of two convs summed (a ResNet
    block's last conv and its downsample) only one absorbs the Add."""
    inits = {i.name for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in model.graph.output}
    chains = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        nodes, inputs, cur, residual = [node], [node.input[0]], node.output[0], False
        while cur not in outputs and len(consumers[cur]) == 1:
            user = consumers[cur][0]
            if user.op_type == "Relu":
                nodes.append(user)
                cur = user.output[0]
                break
            if user.op_type != "Add" or len(user.input) != 2:
                break
            other = user.input[1] if user.input[0] == cur else user.input[0]
            if other not in inits:
                if residual:
                    break
                chains.append((list(nodes), list(inputs), cur))  # the chain without the residual
                inputs.append(other)
                residual = True
            nodes.append(user)
            cur = user.output[0]
        chains.append((nodes, inputs, cur))
    return chains


def _slice(model: onnx.ModelProto, nodes: list[Any], inputs: list[str], output: str,
           infos: dict[str, Any]) -> onnx.ModelProto | None:
    inits = {i.name: i for i in model.graph.initializer}
    if any(n not in infos for n in [*inputs, output]):
        return None
    used = [inits[n] for node in nodes for n in node.input if n in inits]
    g = helper.make_graph(list(nodes), "layer", [infos[n] for n in dict.fromkeys(inputs)], [infos[output]],
                          list({i.name: i for i in used}.values()))
    m = helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def conv_layers(model: onnx.ModelProto, profile: Profile, min_mflops: float = 0.0) -> list[ConvLayer]:
    """The distinct conv layers of ``model`` the direct kernel takes (at least ``min_mflops`` of work), heaviest
    first, each as a one-layer model."""
    import tvm

    if not profile.kernels.use_direct_conv:
        return []
    pinned = onnx.shape_inference.infer_shapes(fix_batch(model, 1))
    infos = {vi.name: vi for vi in [*pinned.graph.input, *pinned.graph.value_info, *pinned.graph.output]}
    cfg = KernelConfig.from_profile(profile)
    whole = SubstituteConv.create(cfg)
    whole(import_onnx(model))
    present = {r["layer"] for r in whole.report if "layer" in r}  # the conv layers as the whole model's build has them
    found: dict[str, ConvLayer] = {}
    for nodes, inputs, output in _layer_chains(pinned):
        layer = _slice(pinned, nodes, inputs, output, infos)
        if layer is None:
            continue
        sub = SubstituteConv.create(cfg)
        try:
            sub(import_onnx(layer))
        except Exception:  # noqa: BLE001 -- a slice TVM cannot import is a layer not compared (it keeps its kernel)
            continue
        rows = [r for r in sub.report if r.get("kernel") != "generic"]
        if (len(rows) == 1 and rows[0]["layer"] in present and rows[0]["layer"] not in found
                and rows[0]["mflops"] >= min_mflops):
            found[rows[0]["layer"]] = ConvLayer(rows[0]["layer"], float(rows[0]["mflops"]), layer)
    del tvm
    return sorted(found.values(), key=lambda c: -c.mflops)


def lowered(layer: ConvLayer, profile: Profile, tuning_db: Path | None, generic: bool,
            stop_after: str | None = None) -> tuple[Any, list[str]]:
    """The layer through the TVM pipeline with its conv hand-written (``generic`` False) or generic + the tuning
    database; (module, kernels the database left naive)."""
    mod = import_onnx(layer.model)
    naive: list[str] = []
    for name, step in pipeline(profile, tuning_db, frozenset({layer.key}) if generic else frozenset()):
        mod = step(mod)
        if name == "apply-tuning-db":
            naive = naive_kernels(mod)
        if name == stop_after:
            break
    return mod, naive


def conv_tasks(layer: ConvLayer, profile: Profile) -> list[Any]:
    """MetaSchedule's tasks of the layer's generic form that hold the convolution."""
    from tvm.s_tir import meta_schedule as ms

    mod, _ = lowered(layer, profile, None, generic=True, stop_after="legalize-and-fuse")
    return [t for t in ms.relax_integration.extract_tasks(mod, tvm_target(profile)) if "conv2d" in t.task_name]


class _VmRunner:
    """A compiled layer on the Relax VM with its inputs bound once (``toolchain.measure.timing.Inferable``)."""

    def __init__(self, ex: Any, feed: dict[str, np.ndarray]) -> None:
        import tvm
        from tvm import relax

        self.main = relax.VirtualMachine(ex, tvm.cpu())["main"]
        self.args = [tvm.runtime.tensor(v) for v in feed.values()]

    def __enter__(self) -> _VmRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self.main(*self.args)]

    def output(self) -> np.ndarray:
        return np.asarray(self.main(*self.args).numpy())


def compare(layer: ConvLayer, profile: Profile, tuning_db: Path) -> dict[str, Any]:
    """Time the layer with the hand-written kernel and with its tuned schedule, interleaved; the choice record:
    ``origin`` "tuned" only where the tuned build is faster and agrees with the kernel."""
    import tvm

    t0 = time.time()
    target = tvm_target(profile)
    tuned_mod, naive = lowered(layer, profile, tuning_db, generic=True)
    if any("conv2d" in n for n in naive):
        return {"origin": "hand", "reason": "no valid tuned record for this layer", "mflops": layer.mflops}
    hand_mod, _ = lowered(layer, profile, None, generic=False)
    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in layer.model.graph.input}
    builds = {name: tvm.compile(mod, target, relax_pipeline=None)
              for name, mod in (("hand", hand_mod), ("tuned", tuned_mod))}
    hand_out, tuned_out = (_VmRunner(builds[n], feed).output() for n in ("hand", "tuned"))
    scale = float(np.abs(hand_out).max()) or 1.0
    agree = hand_out.shape == tuned_out.shape and float(np.abs(hand_out - tuned_out).max()) <= 1e-4 * scale
    lat = measure_interleaved({n: (lambda ex=ex: _VmRunner(ex, feed), feed) for n, ex in builds.items()}, MEASURE)
    hand_us, tuned_us = lat["hand"].p50_ms * 1e3, lat["tuned"].p50_ms * 1e3
    origin = "tuned" if agree and tuned_us < hand_us else "hand"
    rec: dict[str, Any] = {"origin": origin, "hand_us": round(hand_us, 2), "tuned_us": round(tuned_us, 2),
                           "mflops": layer.mflops, "compare_s": round(time.time() - t0, 1),
                           "measured": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if not agree:
        rec["reason"] = "the tuned build's output differs from the hand-written kernel's"
    return rec


__all__ = ["COMPARE_S", "ConvLayer", "compare", "conv_layers", "conv_tasks", "lowered"]
