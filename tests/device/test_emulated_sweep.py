"""Every deployable zoo model, with its trained weights, on every aarch64 profile's CPU, fp32 and int8, on the
emulated device (the lean device runtime under qemu-user: ``edgec device emulate``), on 1000 real test inputs.

- fp32: the aarch64 library agrees with ONNX Runtime on x86 running the source ONNX (max relative error
  < 1e-4, the same argmax on every input);
- int8: the library built from the int8 ONNX (the int8 pass for the tvm target: dynamic, static for convkan)
  gives ONNX Runtime's argmax (running that same int8 ONNX on x86) on >= 99 % of the inputs;
- G2GNet int8 runs the grouped int8 kernel (``grouped_dot_kernel``, on ``sdot``) on every profile: its build's
  kernel table lists it and the library exports it, so the case cannot pass through the generic lowering.

One emulated device per profile, registered as ``<profile>-emulated`` as ``edgec device emulate --profile P``
does, each emulating the profile core's instruction set (``emulate.qemu_cpu``: a library using an extension the
core lacks stops with SIGILL). The GNN teachers (gcn/sage) take the whole graph and are training-time only (tag
``no-export``); their family deploys as the gnn-mlp students. Weights come from the developer's cache
(``$EDGEC_CACHE`` as the run starts, else ~/.cache/edgec) and are trained into it when absent (minutes per model);
exports and builds go to a cache of this run. Latency under emulation means nothing: QUICK timing. Per-case
numbers go to stdout (``-s`` shows them as the sweep runs) and to the junit XML (``--junitxml``) as properties."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from targets.tvm import TvmTarget
from tests.conftest import PLANETOID
from tests.device.emulated_helpers import (
    PLANETOID_DATASETS,
    need_emulator,
    quick_job,
    run_emulated,
    start_emulated_device,
    zoo_onnx,
)
from tests.fixtures.device_farm import Farm
from toolchain import api
from toolchain.core.cache import Artifact, Cache, default_cache_root
from toolchain.core.profile import Profile, load_profile
from toolchain.device import emulate as emulator
from toolchain.zoo.registry import entries

pytestmark = [pytest.mark.slow, pytest.mark.rpc]

PROFILES = ("rpi5", "phone-arm64", "jetson-orin-nano")  # jetson-orin-nano: its Cortex-A78AE CPU (target tvm)
PRECISIONS = ("fp32", "int8")
DEPLOYABLE = sorted(name for name, e in entries().items() if "no-export" not in e.tags)
SAMPLES = 1000
# Read as the module is imported, before each test's isolation of $EDGEC_CACHE: a developer's trained weights.
WEIGHTS_CACHE = default_cache_root()
# The int8 pass per model: the default (dynamic), except convkan: its static QDQ form is the int8 variant that
# keeps int8 through its convolutions (dynamic int8 makes ConvInteger, which edgec's TVM import converts to a
# float32 or int32 conv; 'edgec search' tries both).
INT8_PASS = {"convkan": "int8=mode=static"}
GROUPED_INT8 = "grouped-gemv-i8"  # kernels.tvm.tir.block_sparse.KERNEL_NAME_INT8
# 1000 inputs one at a time under qemu (a conv model: tens of ms each), in one device call.
REQUEST_TIMEOUT_S = 1800


@pytest.fixture(scope="module", params=PROFILES)
def emulated_profile(request: pytest.FixtureRequest,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Profile, Farm]]:
    need_emulator()
    prof = load_profile(request.param)
    farm = start_emulated_device(emulator.key_for(prof), tmp_path_factory.mktemp(f"emulated-{prof.id}"),
                                 cpu=emulator.qemu_cpu(prof))
    yield prof, farm
    farm.close()


@pytest.fixture(scope="module")
def sweep_cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return Cache(tmp_path_factory.mktemp("emulated-sweep") / "cache")


def exported_functions(path: Path) -> set[str]:
    """Names of the functions a 64-bit little-endian ELF shared library defines in its dynamic symbol table."""
    data = path.read_bytes()
    shoff = struct.unpack_from("<Q", data, 40)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names: set[str] = set()
    for _name, sh_type, _fl, _addr, off, size, link, _info, _align, entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for pos in range(off + entsize, off + size, entsize):  # entry 0 is the null symbol
            st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", data, pos)
            if st_shndx != 0 and st_info & 0xF == 2:  # defined, STT_FUNC
                names.add(data[strtab + st_name:data.index(b"\0", strtab + st_name)].decode())
    return names


def assert_runs_the_grouped_int8_kernel(art: Artifact) -> None:
    """The build's kernel table lists the grouped int8 kernel for G2GNet's modular layers, and the aarch64
    library exports each of those functions (TVM's ``__tvm_ffi_<name>`` entry points the VM calls)."""
    table = TvmTarget().kernels(art)
    grouped = [r["name"] for r in table if r["kernel"] == GROUPED_INT8]
    assert len(grouped) >= 2, f"g2gnet int8 did not get the grouped int8 kernel for its two modular layers: {table}"
    missing = {f"__tvm_ffi_{n}" for n in grouped} - exported_functions(art.payload)
    assert not missing, f"{art.payload} does not export {sorted(missing)}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", DEPLOYABLE)
def test_zoo_model_agrees_with_ort_on_the_emulated_profile(
        model: str, precision: str, emulated_profile: tuple[Profile, Farm], sweep_cache: Cache,
        record_property: Any) -> None:
    prof, farm = emulated_profile
    planetoid = PLANETOID if (PLANETOID / "ind.cora.x").is_file() else None
    if entries()[model].dataset in PLANETOID_DATASETS and planetoid is None:
        pytest.skip(f"Planetoid raw files not found at {PLANETOID}")
    src, dataset, data_dir = zoo_onnx(model, sweep_cache, planetoid, weights_cache=Cache(WEIGHTS_CACHE))
    if precision == "int8":
        src, _ = api.optimize(src, [INT8_PASS.get(model, "int8")], cache=sweep_cache, profile=prof, data=dataset,
                              data_dir=data_dir, target="tvm")
    art = api.compile(src, profile=prof, target="tvm", cache=sweep_cache)[0]
    if model == "g2gnet" and precision == "int8":
        assert_runs_the_grouped_int8_kernel(art)
    job = quick_job(art, sweep_cache, SAMPLES, dataset, data_dir)
    assert len(job.x) == SAMPLES, f"{dataset} has only {len(job.x)} test inputs"
    r = run_emulated(farm, sweep_cache, art, job, request_timeout_s=REQUEST_TIMEOUT_S)
    agree, acc = r["agreement"], r["accuracy"]
    row = {"max_rel": agree["max_rel"], "argmax_agreement": agree["argmax_agreement"],
           "task_accuracy": acc["task_accuracy"], "reference_accuracy": acc["reference_accuracy"]}
    for k, v in row.items():
        record_property(k, v)
    print(f"\n{prof.id} {model} {precision}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items()))  # with -s: live
    if precision == "fp32":
        # The aarch64 library agrees with ONNX Runtime on x86 running the same ONNX.
        assert agree["max_rel"] < 1e-4 and agree["argmax_agreement"] == 1.0, agree
    else:
        # Against ORT running the same int8 ONNX: the same argmax on >= 99 % of the inputs.
        assert agree["argmax_agreement"] >= 0.99, agree
