"""The TVM lowering of a profile as an explicit tuple of named steps, readable top to bottom: hand-written
kernel substitution on the Relax graph, the generic CPU pipeline, the tuning database, the vector rule."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernels.tvm import KernelConfig
from kernels.tvm.passes import FastMath, FuseGemvChains, substitution_passes
from kernels.tvm.passes.bf16_weights import StoreWeightsBf16
from kernels.tvm.schedule.vector_rule import schedule_naive
from targets.tvm.database import apply_database, tuned_conv_layers
from targets.tvm.frontend import tvm_target
from targets.tvm.weights_as_inputs import weights_as_inputs
from toolchain.core.profile import Profile

Step = tuple[str, Callable[[Any], Any]]


def pipeline(profile: Profile, tuning_db: Path | None = None,
             conv_generic: frozenset[str] | None = None) -> tuple[Step, ...]:
    """The named Relax -> TIR steps for this profile, in order. With ``tuning_db`` (a MetaSchedule
    database directory, see targets.tvm.tuning) the fused kernels take their tuned schedules, and the conv layers
    whose tuned schedule measured faster than the direct kernel (the database's kernel choices) keep it.
    ``conv_generic``: the conv layer keys left to the generic lowering instead (None: the database's choices)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = tvm_target(profile)

    def seq(passes: list) -> Callable[[Any], Any]:
        def run(mod: Any) -> Any:
            with target:
                return tvm.transform.Sequential(passes)(mod)

        return run

    def apply_db(mod: Any) -> Any:
        assert tuning_db is not None
        return apply_database(mod, target, tuning_db)

    def vector_rule(mod: Any) -> Any:
        return schedule_naive(mod, k.lanes)[0]

    k = KernelConfig.from_profile(profile)
    if conv_generic is None:
        conv_generic = tuned_conv_layers(tuning_db) if tuning_db is not None else frozenset()
    return (
        # Hand-written kernels first, on the Relax graph, while matmul/add/relu are still visible.
        # Conv layers where a tuned schedule measured faster than the direct kernel stay generic for the database.
        ("substitute-kernels", tvm.transform.Sequential(substitution_passes(k, conv_generic),
                                                        name="SubstituteKernels")),
        # Dense layers whose weights are exactly bf16 (the bf16 pass) keep them as bf16: half the bytes.
        ("bf16-weights", StoreWeightsBf16.create(k)),
        # Then a tiny MLP's dense layers become one kernel: one VM call instead of four per layer.
        ("fuse-gemv-chains", FuseGemvChains.create(k)),
        ("decompose", seq([relax.transform.DecomposeOpsForInference()])),
        # exp / sigmoid as vectorizable arithmetic instead of one libm call per element.
        *((("fast-exp", FastMath.create(k)),) if k.fast_exp else ()),
        ("library-dispatch", seq(cpu.library_dispatch_passes(target))),
        ("legalize-and-fuse", seq(cpu.legalize_passes(target))),
        *((("apply-tuning-db", apply_db),) if tuning_db is not None else ()),
        # Whatever no hand-written kernel and no tuning record covers: inlined + vectorized by rule.
        *((("vector-rule", vector_rule),) if k.vector_rule else ()),
        # A model whose weights nearly fill L2 also gets main with its weights as arguments, for the runner to place.
        ("weights-as-inputs", lambda mod: weights_as_inputs(mod, profile.kernels.contiguous_weights_min_kb,
                                                            profile.kernels.contiguous_weights_max_kb)),
        ("dataflow-lower", seq(_dataflow_lower(cpu, target))),
        ("finalize", seq(cpu.finalize_passes(target))),
    )


def _dataflow_lower(cpu: Any, target: Any) -> list:
    """The generic dataflow lowering with RewriteDataflowReshape made optional: it asks every
    elementwise kernel whether it is a reshape and fails on block-free hand-written kernels
    (kernels/tvm: lif). Where it fails, reshapes stay copies instead of views: slower, still correct."""
    import tvm

    def guarded(inner: Any) -> Any:
        @tvm.transform.module_pass(opt_level=0, name="RewriteDataflowReshapeGuarded")
        def run(mod: Any, _ctx: Any) -> Any:
            try:
                return inner(mod)
            except tvm.error.InternalError:
                return mod

        return run

    return [guarded(p) if p.info.name == "RewriteDataflowReshape" else p for p in cpu.dataflow_lower_passes(target)]
