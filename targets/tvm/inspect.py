"""What runs where in a TVM library: every PrimFunc with its origin, and (where the library runs here) the
time each kernel takes per inference."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from kernels.tvm import ATTR_KERNEL, ATTR_RULE
from targets.tvm.frontend import import_tvm


def kernel_table(mod: Any) -> list[dict[str, Any]]:
    """Every PrimFunc with its origin: hand-written (edgec.kernel attr), rule (edgec.rule attr: the vector
    rule of kernels/tvm/schedule/vector_rule.py), tuned (scheduled otherwise) or generic (naive loops)."""
    import tvm

    rows = []
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        attrs = func.attrs or {}
        if ATTR_KERNEL in attrs:
            origin = "hand-written"
        elif ATTR_RULE in attrs:
            origin = "rule"
        elif bool(attrs.get("tirx.is_scheduled", False)):
            origin = "tuned"
        else:
            origin = "generic"
        rows.append({"name": gv.name_hint, "origin": origin, "kernel": str(attrs.get(ATTR_KERNEL, ""))})
    return rows


def kernel_times(lib_path: Path, inputs: list[dict[str, Any]], runs: int = 200) -> dict[str, float]:
    """Seconds per inference spent in each PrimFunc, from the Relax VM's call instrument (wall time
    between the VM's before/after hooks, averaged over ``runs`` after a warmup)."""
    tvm = import_tvm()
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(i["shape"]).astype(i["dtype"])) for i in inputs]
    main = vm["main"]
    for _ in range(20):
        main(*args)
    acc: dict[str, float] = {}
    start = [0.0]

    def instrument(_func: Any, name: str, before: bool, _ret: Any, *_a: Any) -> Any:
        if before:
            start[0] = time.perf_counter()
        else:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - start[0]
        return relax.VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    for _ in range(runs):
        main(*args)
    return {k: v / runs for k, v in acc.items()}
