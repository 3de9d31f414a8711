"""Export stage: a zoo name, an .onnx file, a .pt2 ExportedProgram or a ``module:factory`` -> ONNX artifact.

Every torch export is checked for numerical parity with ONNX Runtime before it is stored.
"""

from __future__ import annotations

import importlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from toolchain.core.cache import Artifact, Cache, StepKey, sha256_file
from toolchain.core.errors import GateFailure, UsageError
from toolchain.core.onnx_io import load_onnx, ort_session
from toolchain.measure.compare import PARITY_RTOL, Parity, compare
from toolchain.zoo.datasets import load_dataset
from toolchain.zoo.registry import get_entry
from toolchain.zoo.trained import load_state_dict_safely, load_trained

EXPORT_VERSION = 1


def torch_to_onnx(module: Any, example: tuple[Any, ...], dynamic_batch: bool = True) -> onnx.ModelProto:
    """torch.onnx (dynamo) export to an in-memory ModelProto, batch dim dynamic where possible."""
    import logging

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if isinstance(module, torch.nn.Module):
        module.eval()
    kwargs: dict[str, Any] = {"dynamo": True, "opset_version": 18, "external_data": False}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = tuple({0: torch.export.Dim("batch", min=1, max=4096)} for _ in example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(module, example, **kwargs, verbose=False)
        except Exception:
            if not dynamic_batch:
                raise
            kwargs.pop("dynamic_shapes")
            prog = torch.onnx.export(module, example, **kwargs, verbose=False)
        prog.optimize()
    buf = io.BytesIO()
    onnx.save_model(prog.model_proto, buf)
    return onnx.load_from_string(buf.getvalue())


def run_ort(model: onnx.ModelProto | Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    sess = ort_session(model)
    return [sess.run(None, f) for f in feeds]


def torch_parity(module: Any, model: onnx.ModelProto, inputs: tuple[np.ndarray, ...]) -> Parity:
    """ONNX Runtime vs torch on the given (batched) inputs."""
    import torch

    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    with torch.no_grad():
        ref = module(*[torch.from_numpy(a) for a in inputs])
    ref_list = [t.numpy() for t in (ref if isinstance(ref, (tuple, list)) else (ref,))]
    got = run_ort(model, [dict(zip(names, inputs, strict=True))])[0]
    return compare(ref_list, got)


def _store_onnx(cache: Cache, sk: StepKey, model: onnx.ModelProto, meta: dict[str, Any]) -> tuple[Artifact, bool]:
    def write(d: Path) -> tuple[str, dict[str, Any]]:
        onnx.save_model(model, d / "model.onnx")
        return "model.onnx", meta

    return cache.get_or_build(sk, "onnx", write)


def import_onnx_file(path: Path, cache: Cache) -> tuple[Artifact, bool]:
    """A user's ONNX file becomes an artifact keyed by its content."""
    model = load_onnx(path)
    digest = sha256_file(path)
    sk = StepKey("import:onnx", (digest,), {"file": path.name}, 1)
    return _store_onnx(cache, sk, model, {"source": str(path), "origin": "user-onnx"})


def export_module(
    module: Any, input_shape: tuple[int, ...], cache: Cache, source_key: str,
    check_inputs: np.ndarray | tuple[np.ndarray, ...] | None = None, form: str = "default",
    example: tuple[Any, ...] | None = None, extra_meta: dict[str, Any] | None = None,
) -> tuple[Artifact, bool]:
    """Export a torch module and prove parity with ONNX Runtime on ``check_inputs`` (or random inputs)."""
    import torch

    sk = StepKey("export", (source_key,), {"input_shape": list(input_shape), "form": form, "opset": 18},
                 EXPORT_VERSION)
    hit = cache.get(sk.digest())
    if hit is not None:
        return hit, True
    if example is None:
        example = (torch.zeros(input_shape, dtype=torch.float32),)
    model = torch_to_onnx(module, example)
    if check_inputs is None:
        check_inputs = np.random.default_rng(0).standard_normal((64, *input_shape[1:])).astype(np.float32)
    # A tuple of arrays feeds a multi-input form (e.g. a spiking step cell with its membrane state).
    checks = check_inputs if isinstance(check_inputs, tuple) else (check_inputs,)
    parity = torch_parity(module, model, checks) if len(checks) == len(example) else None
    if parity is not None and not parity.ok():
        raise GateFailure(
            f"ONNX export does not match torch: max rel error {parity.max_rel:.2e} (limit {PARITY_RTOL:.0e}), "
            f"argmax agreement {parity.argmax_agreement:.4f}; report this model to edgec"
        )
    meta = {"origin": "torch-export", "form": form, "input_shape": list(input_shape),
            "parity": parity.to_json() if parity else None, **(extra_meta or {})}
    return _store_onnx(cache, sk, model, meta)


def load_factory(spec: str) -> Any:
    """``package.module:factory`` -> the module the factory returns (no arguments)."""
    if ":" not in spec:
        raise UsageError(f"{spec!r} is not module:factory; write e.g. mypkg.models:make_net")
    modname, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        raise UsageError(f"cannot import {modname!r} ({e}); check PYTHONPATH") from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{modname!r} has no callable {attr!r}")
    return factory()


def parse_shape(text: str | None) -> tuple[int, ...]:
    if not text:
        raise UsageError("--input-shape is required for this model, e.g. --input-shape 1,784")
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r} must be integers separated by commas, e.g. 1,3,32,32") from None
    if not shape or any(v <= 0 for v in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers")
    return shape


def export_model(
    spec: str, cache: Cache, input_shape: str | None = None, weights: Path | None = None,
    data_dir: Path | None = None, form: str | None = None, progress: bool = True,
) -> tuple[Artifact, bool]:
    """Resolve MODEL (zoo name | .onnx | .pt2 | module:factory) to an ONNX artifact."""
    import_path = Path(spec)
    if spec.endswith(".onnx"):
        return import_onnx_file(import_path, cache)
    if spec.endswith(".pt2"):
        return _export_pt2(import_path, cache)
    if ":" in spec:
        import torch

        module = load_factory(spec)
        if weights is not None:

            module.load_state_dict(load_state_dict_safely(weights))
        shape = parse_shape(input_shape)
        digest = sha256_file(weights) if weights else "no-weights"
        state = b"".join(t.detach().numpy().tobytes() for t in module.state_dict().values()
                         if isinstance(t, torch.Tensor))
        import hashlib

        key = hashlib.sha256(spec.encode() + digest.encode() + state).hexdigest()
        return export_module(module, shape, cache, key)

    entry = get_entry(spec)
    module, _metrics, wart, _ = load_trained(entry, cache, data_dir, progress=progress)

    data = load_dataset(entry.dataset, data_dir)
    form = form or entry.forms[0]
    if form not in entry.forms:
        raise UsageError(f"{entry.name} has export forms {', '.join(entry.forms)}, not {form!r}")
    exp_mod = entry.export_module(module, form) if entry.export_module else module
    check = data.x_test[:1000].reshape(-1, *entry.input_shape[1:])
    example = None
    if entry.example_inputs is not None:
        import torch

        example = entry.example_inputs(module, form, torch.from_numpy(check[:1]))
        if len(example) > 1:  # prove every input of a multi-input form on real data, not only the image
            check = tuple(t.numpy() for t in entry.example_inputs(module, form, torch.from_numpy(check)))
    meta = {"zoo": entry.name, "family": entry.family, "dataset": entry.dataset}
    return export_module(exp_mod, entry.input_shape, cache, wart.key, check_inputs=check, form=form,
                         example=example, extra_meta=meta)


def _export_pt2(path: Path, cache: Cache) -> tuple[Artifact, bool]:
    import torch

    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise UsageError(f"{path} is not a loadable ExportedProgram ({type(e).__name__}); re-save it with torch.export.save") from None
    module = ep.module()
    example = tuple(
        torch.zeros(tuple(int(d) for d in n.meta["val"].shape), dtype=n.meta["val"].dtype)
        for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
    )
    model = torch_to_onnx(ep, example, dynamic_batch=False)
    parity = torch_parity(module, model, tuple(e.numpy() + 0.5 for e in example)) if len(example) == 1 else None
    if parity is not None and not parity.ok():
        raise GateFailure(f"ONNX export of {path} does not match torch (max rel {parity.max_rel:.2e})")
    sk = StepKey("export:pt2", (sha256_file(path),), {"opset": 18}, EXPORT_VERSION)
    return _store_onnx(cache, sk, model, {"origin": "pt2", "source": str(path),
                                          "parity": parity.to_json() if parity else None})
