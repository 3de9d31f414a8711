"""Helpers for kernel tests and benchmarks: tiny ONNX graphs and in-process TVM builds with or without the
hand-written kernel substitution (the generic lowering is the reference).

Not part of the kernels themselves: this module imports ``targets.tvm`` (exempt from the layer contract)
and is left out of the kernel source digest (``targets.tvm.build.kernel_sources_digest``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernels.tvm import KernelConfig
from kernels.tvm.passes import substitution_passes
from targets.tvm.frontend import import_onnx, tvm_target
from targets.tvm.inspect import kernel_table
from targets.tvm.pipeline import pipeline
from toolchain.core.profile import Profile


def dense_onnx(weights: list[np.ndarray], biases: list[np.ndarray | None], relu: bool = True,
               gemm: bool = False, rows: int = 1) -> onnx.ModelProto:
    """x[rows, K] -> chain of dense layers (MatMul + Add, or Gemm with transB like torch's Linear)."""
    nodes, inits, cur = [], [], "x"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        out = f"d{i}"
        if gemm:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"W{i}"))
            ins = [cur, f"W{i}"] + ([f"B{i}"] if b is not None else [])
            nodes.append(helper.make_node("Gemm", ins, [out], transB=1))
        else:
            inits.append(numpy_helper.from_array(w, f"W{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [out if b is None else f"m{i}"]))
            if b is not None:
                nodes.append(helper.make_node("Add", [f"m{i}", f"B{i}"], [out]))
        if b is not None:
            inits.append(numpy_helper.from_array(b, f"B{i}"))
        cur = out
        if relu and i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    k, n = weights[0].shape[0], weights[-1].shape[1]
    g = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [rows, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def block_diagonal(k: int, n: int, groups: int, seed: int = 0) -> np.ndarray:
    """A (k, n) weight with ``groups`` dense diagonal blocks and zeros elsewhere (1 - 1/groups sparse)."""
    rng = np.random.default_rng(seed)
    w = np.zeros((k, n), np.float32)
    for g in range(groups):
        rs, cs = slice(g * k // groups, (g + 1) * k // groups), slice(g * n // groups, (g + 1) * n // groups)
        w[rs, cs] = rng.standard_normal((rs.stop - rs.start, cs.stop - cs.start)) / np.sqrt(k / groups)
    return w


def with_kernels(profile: Profile, **changes: Any) -> Profile:
    """``profile`` with its [kernels] table changed (e.g. use_grouped_matmul=False)."""
    return dataclasses.replace(profile, kernels=dataclasses.replace(profile.kernels, **changes))


def substitute(model: onnx.ModelProto, profile: Profile) -> tuple[Any, list[dict[str, Any]]]:
    """(module, one row per kernel put in) after only the kernel substitution passes on the imported ``model``."""
    import tvm

    passes = substitution_passes(KernelConfig.from_profile(profile))
    mod = tvm.transform.Sequential(passes)(import_onnx(model))
    return mod, [row for p in passes for row in p.report]


def build_vm(model: onnx.ModelProto, profile: Profile, substitute: bool = True) -> tuple[Any, list[dict[str, Any]]]:
    """(callable main, kernel table) for ``model`` built in this process for a host-native profile.
    ``substitute=False`` builds TVM's own generic lowering: no hand-written kernels, no fast exp, no
    vector rule (the baseline the kernels are tested against)."""
    import tvm
    from tvm import relax

    mod = import_onnx(model)
    for name, step in pipeline(profile):
        if name in ("substitute-kernels", "fast-exp", "vector-rule") and not substitute:
            continue
        mod = step(mod)
    table = kernel_table(mod)
    ex = tvm.compile(mod, tvm_target(profile), relax_pipeline=None)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    main = vm["main"]

    def run(*xs: np.ndarray) -> np.ndarray:
        out = main(*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in xs])
        return out.numpy()

    run.raw = main  # type: ignore[attr-defined]
    return run, table
