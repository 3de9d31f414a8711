"""A library whose weights nearly fill L2 exports them, and the runner keeps them in one buffer on a huge page."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kernels.tvm.testing import dense_onnx, with_kernels
from targets.tvm.build import build_library
from toolchain.core.profile import load_profile
from toolchain.core.tvm_abi import MAIN_WITH_WEIGHTS, WEIGHTS
from toolchain.device.runners import HUGE_PAGE, TvmLibRunner, weight_buffer

PROFILE = with_kernels(load_profile("x86-avx512"), contiguous_weights_min_kb=0)  # the test MLP has 27 KB


def mlp(seed: int = 0) -> tuple[object, np.ndarray]:
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((96, 64)).astype(np.float32) * 0.1, rng.standard_normal((64, 10)).astype(np.float32)]
    bs = [rng.standard_normal(64).astype(np.float32), rng.standard_normal(10).astype(np.float32)]
    return dense_onnx(ws, bs), rng.standard_normal((1, 96)).astype(np.float32)


def test_runner_runs_the_weights_from_its_own_buffer_with_mains_results(tmp_path: Path) -> None:
    import tvm
    from tvm import relax

    model, x = mlp()
    lib = tmp_path / "m.so"
    build_library(model, PROFILE, lib)
    runner = TvmLibRunner(lib, ["x"], 1)
    assert runner.vm.module.implements_function(MAIN_WITH_WEIGHTS) and runner.vm.module.implements_function(WEIGHTS)
    exported = list(runner.vm[WEIGHTS]())
    assert len(runner.weights) == len(exported) >= 1  # the fp32 chain kernel pools its constants in one
    # copies, not the VM's constants, laid out from a 2 MB boundary on, each on 64 bytes, in argument order
    ptrs = [w.data_ptr() for w in runner.weights]
    assert ptrs[0] % HUGE_PAGE == 0 and all(p % 64 == 0 for p in ptrs) and ptrs == sorted(ptrs)
    assert not {w.data_ptr() for w in exported} & set(ptrs)
    for a, b in zip(runner.weights, exported, strict=True):
        assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
        assert np.array_equal(a.numpy(), b.numpy())
    got = runner.infer({"x": x})[0]
    want = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, want)
    # the bound entry point reads the runner's copies: changing them changes the result
    runner.weights[0].copyfrom(np.zeros(tuple(runner.weights[0].shape), runner.weights[0].numpy().dtype))
    assert not np.array_equal(runner.infer({"x": x})[0], want)


def test_weights_outside_the_profiles_window_stay_inside_main(tmp_path: Path) -> None:
    model, x = mlp(1)
    for name, profile in (("off", with_kernels(PROFILE, contiguous_weights_max_kb=0)),
                          ("above", with_kernels(PROFILE, contiguous_weights_max_kb=16)),  # 27 KB of weights
                          ("below", with_kernels(PROFILE, contiguous_weights_min_kb=32)),
                          ("default", load_profile("x86-avx512"))):
        lib = tmp_path / f"{name}.so"
        build_library(model, profile, lib)
        runner = TvmLibRunner(lib, ["x"], 1)
        assert not runner.vm.module.implements_function(WEIGHTS) and runner.weights == []
        assert runner.infer({"x": x})[0].shape == (1, 10)


def test_weight_buffer_starts_on_a_huge_page_and_is_zeroed() -> None:
    buf = weight_buffer(3 * HUGE_PAGE // 2)
    assert buf.ctypes.data % HUGE_PAGE == 0 and buf.nbytes == 3 * HUGE_PAGE // 2 and buf.dtype == np.uint8
    assert not buf.any()
    buf[:] = 7  # writable to the end
