"""Fused LIF kernels vs the generic lowering and ONNX Runtime: the zoo's SpikingMLP (unrolled T), whose
layers become one event-driven kernel each (matmul + recurrence), and a bare recurrence (current as
the graph input), which keeps the recurrence-only kernel. Spike outputs must match exactly. The int8 form
(the int8 pass's dynamic-int8 layers) takes the int8 layer kernel: bit-exact vs TVM's generic lowering of
the same graph, agreeing with ONNX Runtime's int8 on real Fashion-MNIST images, on the CPU's dot products
(vpdpbusd with AVX-512 VNNI, vpmaddubsw on AVX2, sdot on aarch64)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kernels.tvm.testing import build_vm, substitute, with_kernels
from targets.tvm.build import build_library
from tests.fixtures.disassembly import assert_instructions, built_library, function_bodies, objdump_for
from toolchain.core.onnx_io import ort_session
from toolchain.core.profile import Profile, load_profile
from toolchain.device import emulate
from toolchain.export import run_ort, torch_to_onnx
from toolchain.passes import PassContext
from toolchain.passes.int8 import Config as Int8Config
from toolchain.passes.int8 import run as run_int8
from toolchain.zoo.spiking import LIF, SpikingMLP


def _inputs(rng: np.random.Generator) -> list[np.ndarray]:
    """Random images with many exact zeros (skipped input rows), a fully dense one, and a blank one."""
    sparse = rng.random((1, 784)).astype(np.float32)
    sparse[sparse < 0.5] = 0.0
    return [rng.random((1, 784)).astype(np.float32), sparse, np.ones((1, 784), np.float32),
            np.zeros((1, 784), np.float32)]


@pytest.mark.parametrize(("reset", "steps"), [("subtract", 8), ("zero", 8), ("subtract", 16)])
def test_fused_lif_layer_matches_generic_and_ort(reset: str, steps: int) -> None:
    torch.manual_seed(0)
    net = SpikingMLP(hidden=[37], steps=steps, beta=0.875, threshold=1.0, reset=reset,
                     surrogate="fast_sigmoid").eval()
    with torch.no_grad():  # enough current that neurons actually spike
        for fc in net.fcs:
            fc.weight.mul_(4.0)
    model = torch_to_onnx(net, (torch.rand(1, 784),), dynamic_batch=False)
    base = load_profile("x86-avx512")
    generic, gtable = build_vm(model, base, substitute=False)
    assert all(r["origin"] == "generic" for r in gtable)
    # The layer kernel at any T, and the profile's default (above lif_layer_max_rows: GEMV + fused recurrence).
    for prof, kernels in ((with_kernels(base, lif_layer_max_rows=steps), {"lif-layer-f32": 2}),
                          (base, {"lif-layer-f32": 2} if steps <= base.kernels.lif_layer_max_rows
                           else {"lif-fused-f32": 2, "gemv-packed-f32": 2})):
        fused, table = build_vm(model, prof)
        names = [r["kernel"] for r in table]
        assert {k: names.count(k) for k in kernels} == kernels, names
        total = 0.0
        for x in _inputs(np.random.default_rng(1)):
            want = run_ort(model, [{model.graph.input[0].name: x}])[0][0]
            np.testing.assert_array_equal(fused(x), generic(x))
            np.testing.assert_array_equal(fused(x), want)
            total += float(want.sum())
        assert total > 0  # spikes reached the output: the comparison saw real recurrences


class _Recurrence(torch.nn.Module):
    """LIF over T steps of a current given as the input (no matmul in the graph)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.lif, self.steps = LIF(0.9, 1.0, "subtract", steps), steps

    def forward(self, cur: torch.Tensor) -> torch.Tensor:
        u = torch.zeros(1, cur.shape[1])
        out = []
        for t in range(self.steps):
            s, u = self.lif(cur[t : t + 1], u)
            out.append(s)
        return torch.cat(out, 0)


def test_fused_recurrence_without_matmul() -> None:
    model = torch_to_onnx(_Recurrence(8).eval(), (torch.rand(8, 21),), dynamic_batch=False)
    prof = load_profile("x86-avx512")
    fused, table = build_vm(model, prof)
    generic, _ = build_vm(model, prof, substitute=False)
    assert [r["kernel"] for r in table] == ["lif-fused-f32"]
    x = (np.random.default_rng(3).random((8, 21)) * 1.5).astype(np.float32)
    np.testing.assert_array_equal(fused(x), generic(x))
    assert fused(x).sum() > 0


def test_fused_lif_off_in_profile() -> None:
    net = SpikingMLP(hidden=[8], steps=4, beta=0.9, threshold=1.0, reset="zero", surrogate="fast_sigmoid").eval()
    model = torch_to_onnx(net, (torch.rand(1, 784),), dynamic_batch=False)
    _, table = build_vm(model, with_kernels(load_profile("x86-avx512"), use_fused_lif=False))
    assert not {"lif-fused-f32", "lif-layer-f32"} & {r["kernel"] for r in table}


# --- int8: the dynamic-int8 layer (int8 pass) + recurrence as one kernel on the CPU's int8 dot products ---

ORT_AGREEMENT = 0.99  # share of real Fashion-MNIST test images whose output argmax matches ONNX Runtime's int8


def _int8_snn(profile_id: str, steps: int, hidden: int = 37, seed: int = 0) -> onnx.ModelProto:
    """A SpikingMLP 784-hidden-10 (subtract reset, weights scaled up so neurons spike) through the int8 pass
    (dynamic, as the search builds it) for ``profile_id``."""
    torch.manual_seed(seed)
    net = SpikingMLP(hidden=[hidden], steps=steps, beta=0.875, threshold=1.0, reset="subtract",
                     surrogate="fast_sigmoid").eval()
    with torch.no_grad():
        for fc in net.fcs:
            fc.weight.mul_(4.0)
    model = torch_to_onnx(net, (torch.rand(1, 784),), dynamic_batch=False)
    ctx = PassContext(profile=load_profile(profile_id), target="tvm")
    return run_int8(model, Int8Config(mode="dynamic"), ctx).model


@pytest.mark.parametrize(("profile_id", "steps"), [
    ("x86-avx512", 8),
    pytest.param("x86-avx512", 16, marks=pytest.mark.slow),  # the zoo's T (its generic build is slow)
    pytest.param("x86-avx512", 5, marks=pytest.mark.slow),  # odd rows
    pytest.param("x86-avx2", 8, marks=pytest.mark.slow),
])
def test_int8_lif_layer_is_exact_vs_generic_and_agrees_with_ort(profile_id: str, steps: int,
                                                                fashion: object) -> None:
    """Both layers become the int8 LIF layer kernel; spike counts are bit-identical to TVM's generic lowering
    of the same int8 graph (integer products, the graph's own float operations), and agree with ONNX Runtime's
    int8 on real Fashion-MNIST test images."""
    model = _int8_snn(profile_id, steps)
    prof = with_kernels(load_profile(profile_id), lif_layer_max_rows=steps)
    fast, table = build_vm(model, prof)
    assert [r["kernel"] for r in table if r["kernel"].startswith("lif")] == ["lif-layer-i8"] * 2, table
    assert not any("floor" in r["name"] for r in table), table  # the rate code went into the first kernel
    generic, _ = build_vm(model, prof, substitute=False)
    xs = fashion.x_test[:200].reshape(200, 784).astype(np.float32)  # type: ignore[attr-defined]
    for x in [*_inputs(np.random.default_rng(1))[:3], *xs[:8, None]]:  # random, sparse, all-ones, real
        np.testing.assert_array_equal(fast(x), generic(x))
    sess = ort_session(model, 1)
    ours = np.concatenate([fast(x[None]) for x in xs])
    want = np.concatenate([sess.run(None, {model.graph.input[0].name: x[None]})[0] for x in xs])
    assert ours.sum() > 0  # output spikes: the comparison saw real recurrences
    assert np.mean(ours.argmax(1) == want.argmax(1)) >= ORT_AGREEMENT
    assert np.mean(ours == want) >= ORT_AGREEMENT  # spike counts, not only the argmax


def test_int8_lif_layer_needs_the_row_bound_and_an_int8_isa() -> None:
    """Both int8 layers take the int8 layer kernel, the first with the rate code computed inside; above
    lif_layer_max_rows the int8 layer keeps the int8 GEMV + fused recurrence; a CPU without int8 dot products
    (int8_isa none) never gets the int8 layer kernel."""
    model = _int8_snn("x86-avx512", 8, hidden=16)
    base = load_profile("x86-avx512")
    _, rows = substitute(model, with_kernels(base, lif_layer_max_rows=8))
    lifs = [r for r in rows if r["kernel"].startswith("lif")]
    assert [r["kernel"] for r in lifs] == ["lif-layer-i8"] * 2
    # The first layer's input is the rate code of the image, elementwise in it: computed inside the kernel.
    assert [r["input_code"] for r in lifs] == [True, False]
    _, rows = substitute(model, with_kernels(base, lif_layer_max_rows=4))
    names = [r["kernel"] for r in rows]
    assert "lif-layer-i8" not in names and names.count("lif-fused-f32") == 2, names
    nodot = replace(base, cpu=replace(base.cpu, int8_dot="none", vector_bits=128))
    _, rows = substitute(model, with_kernels(nodot, lif_layer_max_rows=8))
    assert "lif-layer-i8" not in [r["kernel"] for r in rows]


def _lif_disassembly(model: onnx.ModelProto, profile: Profile, tmp_path: Path) -> dict[str, str]:
    """symbol -> disassembly of the int8 LIF kernels' bodies in the library built for ``profile``."""
    lib = tmp_path / "lib.so"
    meta = built_library(model, profile, lib)
    assert [r["kernel"] for r in meta["kernels"] if r["kernel"].startswith("lif")] == ["lif-layer-i8"] * 2
    out = function_bodies(lib, objdump_for(profile), lambda sym: "lif" in sym and sym.endswith("_compute_"))
    assert len(out) == 3, sorted(out)  # the two layer kernels' bodies and the whole library
    return out


@pytest.mark.parametrize(("profile_id", "present", "absent"), [
    ("x86-avx512", [r"\bvpdpbusd\b"], []),
    ("x86-avx2", [r"\bvpmaddubsw\b", r"\bvpmaddwd\b"], [r"\bvpdpbusd\b", r"zmm"]),  # a Haswell: no VNNI, no AVX-512
    ("rpi5", [r"\bsdot\b"], []),
])
def test_int8_lif_layer_uses_the_dot_product_instructions(profile_id: str, present: list[str], absent: list[str],
                                                          tmp_path: Path) -> None:
    prof = with_kernels(load_profile(profile_id), lif_layer_max_rows=8)
    assert_instructions(_lif_disassembly(_int8_snn(profile_id, 8, hidden=24), prof, tmp_path), present, absent)


EMULATED_RUN = """
import sys
import numpy as np
import tvm
from tvm import relax
vm = relax.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
xs = np.load(sys.argv[2])
np.save(sys.argv[3], np.concatenate([vm["main"](tvm.runtime.tensor(x[None])).numpy() for x in xs]))
"""


@pytest.mark.slow
def test_int8_lif_layer_on_sdot_is_exact_on_emulated_aarch64(tmp_path: Path, fashion: object) -> None:
    """The sdot form (activations shifted to int8, skipped groups put back by the active weight sums) run on an
    emulated aarch64 (qemu, dotprod): spike counts bit-identical to TVM's generic lowering of the same int8
    graph on x86, on real Fashion-MNIST images."""
    if emulate.missing_tools() or not emulate.is_ready():
        pytest.skip("the aarch64 emulator is not provisioned: 'make emulator' (EDGEC_EMULATOR_DIR)")
    prof = with_kernels(load_profile("rpi5"), lif_layer_max_rows=8)
    if prof.cpu.cross_cc and shutil.which(prof.cpu.cross_cc) is None:
        pytest.skip("aarch64 cross compiler missing: apt-get install gcc-aarch64-linux-gnu")
    model = _int8_snn("rpi5", 8)
    meta = build_library(model, prof, tmp_path / "lib.so")
    assert [r["kernel"] for r in meta["kernels"] if r["kernel"].startswith("lif")] == ["lif-layer-i8"] * 2
    xs = fashion.x_test[:60].reshape(60, 784).astype(np.float32)  # type: ignore[attr-defined]
    np.save(tmp_path / "x.npy", xs)
    (tmp_path / "run.py").write_text(EMULATED_RUN)
    d = emulate.emulator_dir()
    sysroot = d / "sysroot"
    env = {**os.environ, "QEMU_LD_PREFIX": str(sysroot), "PYTHONPATH": str(d / "site"), "PYTHONNOUSERSITE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONHOME", None)
    subprocess.run(["qemu-aarch64", "-cpu", emulate.QEMU_CPU_FALLBACK, "-L", str(sysroot),
                    str(sysroot / "usr" / "bin" / emulate.PYTHON), str(tmp_path / "run.py"), str(tmp_path / "lib.so"),
                    str(tmp_path / "x.npy"), str(tmp_path / "arm.npy")], env=env, check=True, timeout=900)
    generic, _ = build_vm(model, load_profile("x86-avx512"), substitute=False)
    want = np.concatenate([generic(x[None]) for x in xs])
    got = np.load(tmp_path / "arm.npy")
    assert want.sum() > 0
    np.testing.assert_array_equal(got, want)
