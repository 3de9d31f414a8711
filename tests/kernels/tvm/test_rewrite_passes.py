"""The kernel rewrites as TVM module passes (kernels/tvm/passes) and the config they are built from."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tvm

from kernels.tvm import KernelConfig
from kernels.tvm.passes import FuseGemvChains, SubstituteGemv, substitution_passes
from kernels.tvm.testing import dense_onnx
from targets.tvm.frontend import import_onnx
from toolchain.core.profile import KernelSpec, load_profile


def test_kernel_config_from_spec_and_mapping() -> None:
    spec = load_profile("x86-avx512").kernels
    cfg = KernelConfig.from_spec(spec)
    assert (cfg.gemv, cfg.lanes, cfg.block_n, cfg.chain_max_kb) == (spec.use_gemv, spec.vector_lanes,
                                                                     spec.gemv_block_n, spec.gemv_chain_max_kb)
    assert KernelConfig.from_spec(KernelSpec()) == KernelConfig()  # the same defaults
    assert KernelConfig.from_mapping({"use_gemv": False, "lanes": 8}) == KernelConfig(gemv=False, lanes=8)
    with pytest.raises(ValueError, match="gemv_variant"):
        KernelConfig.from_mapping({"gemv_variant": "packed"})


def test_substitution_passes_follow_the_config() -> None:
    names = [p.info.name for p in substitution_passes(KernelConfig())]
    assert names == ["FuseKan", "FuseLif", "DensifyGrouped", "SubstituteGemv", "SubstituteConv"]
    assert [p.info.name for p in substitution_passes(KernelConfig(gemv=False, lif=False, conv=False))] == ["FuseKan"]


def test_pass_objects_report_what_they_replaced() -> None:
    rng = np.random.default_rng(0)
    dims = [40, 24, 18]
    ws = [rng.standard_normal((a, c)).astype(np.float32) for a, c in itertools.pairwise(dims)]
    mod = import_onnx(dense_onnx(ws, [rng.standard_normal(c).astype(np.float32) for c in dims[1:]]))
    gemv, chain = SubstituteGemv.create(KernelConfig()), FuseGemvChains.create(KernelConfig())
    assert isinstance(gemv, tvm.transform.ModulePass) and gemv.info.name == "SubstituteGemv"
    out = tvm.transform.Sequential([gemv, chain])(mod)
    assert [(r["kernel"], r["k"], r["n"], r["relu"]) for r in gemv.report] == [
        ("gemv-packed-f32", 40, 24, True), ("gemv-packed-f32", 24, 18, False)]
    assert [(r["kernel"], r["shape"]) for r in chain.report] == [("gemv-chain-f32", [40, 24, 18])]
    prims = [gv.name_hint for gv, f in out.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert prims == ["edgec_gemv_chain_0"]  # the per-layer kernels the chain replaced are gone
    gemv(mod)  # a second run reports only itself
    assert len(gemv.report) == 2
