"""Export stage: a zoo name, an .onnx file, a .pt2 ExportedProgram or a ``module:factory`` -> ONNX artifact.

Every torch export is checked for numerical parity with ONNX Runtime before it is stored.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from toolchain.core.cache import Artifact, Cache, StepKey, sha256_file
from toolchain.core.errors import EdgecError, GateFailure, UsageError
from toolchain.core.onnx_io import check_input_size, load_onnx, ort_session
from toolchain.measure.compare import Parity, compare
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
    # torch.export prints partial graphs of a failed trace straight to sys.stderr: the error says what failed.
    chatter = io.StringIO()
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stderr(chatter), \
            contextlib.redirect_stdout(chatter):
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


def _static_batch(model: onnx.ModelProto, names: list[str]) -> int | None:
    """The fixed leading dimension of the model's first input (some layers trace their batch into the graph), or
    None where it is dynamic."""
    vi = next((i for i in model.graph.input if names and i.name == names[0]), None)
    dims = vi.type.tensor_type.shape.dim if vi is not None else []
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def torch_parity(module: Any, model: onnx.ModelProto, inputs: tuple[np.ndarray, ...]) -> Parity:
    """ONNX Runtime vs torch on the given (batched) inputs. A model exported with a fixed batch is checked in
    groups of that batch (sample by sample for batch 1): the same inputs, fed the way the graph takes them."""
    import torch

    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    n, fixed = len(inputs[0]), _static_batch(model, names)
    if fixed is not None and fixed != n:
        if fixed > n:  # repeat the inputs to fill one fixed batch
            inputs = tuple(np.concatenate([a] * (fixed // n + 1))[:fixed] for a in inputs)
            n = fixed
        groups = [tuple(a[i : i + fixed] for a in inputs) for i in range(0, n - fixed + 1, fixed)]
    else:
        groups = [inputs]
    refs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for g in groups:
            ref = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in g])
            refs.append([t.numpy() for t in (ref if isinstance(ref, (tuple, list)) else (ref,))])
    gots = run_ort(model, [dict(zip(names, g, strict=True)) for g in groups])
    if len(groups) == 1:
        return compare(refs[0], gots[0])
    ref_list = [np.concatenate([np.atleast_1d(r[k]) for r in refs]) for k in range(len(refs[0]))]
    got = [np.concatenate([np.atleast_1d(g[k]) for g in gots]) for k in range(len(gots[0]))]
    return compare(ref_list, got)


def _store_onnx(cache: Cache, sk: StepKey, model: onnx.ModelProto, meta: dict[str, Any]) -> tuple[Artifact, bool]:
    def write(d: Path) -> tuple[str, dict[str, Any]]:
        onnx.save_model(model, d / "model.onnx")
        return "model.onnx", meta

    return cache.get_or_build(sk, "onnx", write)


def import_onnx_file(path: Path, cache: Cache) -> tuple[Artifact, bool]:
    """A user's ONNX file becomes an artifact keyed by its content, in the one form passes and targets see
    (``load_onnx`` normalizes old-style files: initializers are not graph inputs, IR version >= 4)."""
    model = load_onnx(path)
    digest = sha256_file(path)
    sk = StepKey("import:onnx", (digest,), {"file": path.name}, 2)
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
        raise GateFailure(f"ONNX export does not match torch: {parity.problem()}; report this model to edgec")
    meta = {"origin": "torch-export", "form": form, "input_shape": list(input_shape),
            "parity": parity.to_json() if parity else None, **(extra_meta or {})}
    return _store_onnx(cache, sk, model, meta)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def load_factory(spec: str) -> Any:
    """``package.module:factory`` -> the torch module the factory returns (called with no arguments). Whatever
    goes wrong in the user's code (import, call, wrong return type) is a one-line UsageError naming ``spec``."""
    import inspect

    import torch

    if ":" not in spec:
        raise UsageError(f"{spec!r} is not module:factory; write e.g. mypkg.models:make_net")
    modname, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        raise UsageError(f"cannot import {modname!r} ({e}); check PYTHONPATH") from None
    except Exception as e:  # noqa: BLE001 -- any failure of the user's module is the user's input
        raise UsageError(f"importing {modname!r} failed: {type(e).__name__}: {_first_line(e)}; fix the module") \
            from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{modname!r} has no callable {attr!r}")
    try:
        required = [p.name for p in inspect.signature(factory).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):  # a builtin without a signature: just call it
        required = []
    if required:
        raise UsageError(f"{spec} needs argument(s) {', '.join(required)}; edgec calls the factory with none: "
                         "give them defaults or wrap it in a function without arguments")
    try:
        module = factory()
    except Exception as e:  # noqa: BLE001 -- the user's factory code
        raise UsageError(f"{spec} raised {type(e).__name__}: {_first_line(e)}; fix the factory") from None
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"{spec} returned a {type(module).__name__}, not a torch.nn.Module; return the model")
    return module


def parse_shape(text: str | None) -> tuple[int, ...]:
    if not text:
        raise UsageError("--input-shape is required for this model, e.g. --input-shape 1,784")
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r} must be integers separated by commas, e.g. 1,3,32,32") from None
    if not shape or any(v <= 0 for v in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers")
    check_input_size(shape, "--input-shape")
    check_input_size((64, *shape[1:]), "--input-shape (64 samples for the parity check)")
    return shape


def _factory_module(spec: str, shape: tuple[int, ...], weights: Path | None) -> Any:
    """The factory's module with ``weights`` loaded, proven to run on an input of ``shape``."""
    import torch

    module = load_factory(spec)
    if weights is not None:
        try:
            module.load_state_dict(load_state_dict_safely(weights))
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--weights {weights} does not fit {spec}: {_first_line(e)}; pass the checkpoint "
                             "saved from this model's state_dict()") from None
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(shape, dtype=torch.float32))
    except Exception as e:  # noqa: BLE001 -- the user's forward code
        raise UsageError(f"{spec} fails on an input of shape {list(shape)} ({type(e).__name__}: {_first_line(e)}); "
                         "check --input-shape") from None
    return module


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
        shape = parse_shape(input_shape)

        import torch

        module = _factory_module(spec, shape, weights)
        digest = sha256_file(weights) if weights else "no-weights"
        state = b"".join(t.detach().numpy().tobytes() for t in module.state_dict().values()
                         if isinstance(t, torch.Tensor))
        import hashlib

        key = hashlib.sha256(spec.encode() + digest.encode() + state).hexdigest()
        with _user_model_errors(spec):
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


# What a .pt2 archive may hold for edgec to load it (torch.export.load would unpickle the rest).
_PT2_OP_PREFIXES = ("torch.ops.aten.", "torch.ops.prims.", "torch.ops.higher_order.", "math.", "torch.sym_")
# Python operators a graph may call on shapes and tuples (not operator.call / attrgetter / methodcaller: gadgets).
_PT2_PY_OPERATORS = frozenset(f"_operator.{n}" for n in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt", "le", "gt", "ge",
    "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "getitem", "matmul", "index", "truth"))
_PT2_REFUSED_OPS = ("torch.ops.aten.from_file.",)  # reads an arbitrary file at run time
_SYM_FUNCTIONS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "IntTrueDiv", "FloatTrueDiv", "TruncToFloat", "TruncToInt", "RoundToInt", "ToFloat", "Identity",
    "IsNonOverlappingAndDenseIndicator", "OpaqueUnaryFn_sqrt", "floor", "ceiling",
})
_SYM_NAMES = frozenset({"true", "false", "oo", "zoo", "nan", "S", "True", "False", "None"})
_SYM_MAX_INT = 1 << 62
_SYM_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,9}")


def _check_sym_expr(expr: str, path: Path) -> None:
    """torch deserializes symbolic shapes with ``sympy.sympify`` (Python ``eval``): allow only sympy's ``srepr``
    of shape arithmetic (named sympy constructors, short string and small number literals)."""
    import ast

    def refuse() -> UsageError:
        return UsageError(f"{path}: symbolic shape expression {expr[:60]!r} is not plain shape arithmetic; "
                          "refusing to evaluate it (re-save the program with torch.export.save)")

    if len(expr) > 4000:
        raise refuse()
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        raise refuse() from None
    allowed_ops = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Not,
                   ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYM_FUNCTIONS:
                raise refuse()
        elif isinstance(node, ast.Name):
            # a bare name is a sympy constructor, a constant, or a shape symbol like s77 / u0: never a builtin
            if not (node.id in _SYM_FUNCTIONS or node.id in _SYM_NAMES or _SYM_SYMBOL.fullmatch(node.id)):
                raise refuse()
        elif isinstance(node, ast.Constant):
            v = node.value
            ok = (v is None or isinstance(v, bool) or (isinstance(v, int) and abs(v) <= _SYM_MAX_INT)
                  or isinstance(v, float) or (isinstance(v, str) and len(v) <= 64 and v.replace("_", "").isalnum()))
            if not ok:
                raise refuse()
        elif isinstance(node, ast.keyword):
            if node.arg is None or node.arg.startswith("_"):
                raise refuse()
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load,
                                   *allowed_ops)):
            raise refuse()


def _pt2_call_allowed(target: str) -> bool:
    allowed = target in _PT2_PY_OPERATORS or target.startswith(_PT2_OP_PREFIXES)
    return allowed and not target.startswith(_PT2_REFUSED_OPS)


def _check_pt2_graph(obj: Any, path: Path) -> None:
    """Every node target an ATen/prims operator (a call of anything else runs arbitrary Python), every
    symbolic expression plain shape arithmetic; recursive over nested subgraphs."""
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            target = cur.get("target")
            is_node = isinstance(target, str) and "inputs" in cur and "outputs" in cur
            if is_node and not _pt2_call_allowed(str(target)):
                raise UsageError(f"{path}: graph calls {target[:80]!r}, which is not an ATen/prims operator; "
                                 "edgec loads only .pt2 graphs of ATen operators")
            expr = cur.get("expr_str")
            if isinstance(expr, str):
                _check_sym_expr(expr, path)
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)


# The torch.export.save archive layout (torch/export/pt2_archive/constants.py), repeated here so that a hostile
# archive is refused before torch is even imported.
_PT2_MODELS_DIR = "models/"
_PT2_WEIGHTS_DIR = "data/weights/"
_PT2_CONSTANTS_DIR = "data/constants/"
_PT2_TENSOR_PREFIX = {"weights": "weight_", "constants": "tensor_"}
_PT2_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")


def _pt2_members(data: bytes, path: Path) -> dict[str, bytes]:
    """The archive's members by name below its single root folder (how torch names them)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            roots = {i.filename.split("/", 1)[0] for i in infos}
            if len(roots) != 1 or sum(i.file_size for i in infos) > 8 * len(data) + (1 << 20):
                raise ValueError("not one root folder, or members far larger than the archive")
            members = {i.filename.split("/", 1)[1]: z.read(i) for i in infos if "/" in i.filename}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise UsageError(f"{path} is not a torch.export archive ({type(e).__name__}); "
                         "re-save it with torch.export.save") from None
    if members.get("archive_format") != b"pt2":
        raise UsageError(f"{path} is not a torch.export archive (no archive_format 'pt2'); "
                         "re-save it with torch.export.save")
    return members


def _json_member(members: dict[str, bytes], name: str, path: Path) -> Any:
    if name not in members:
        raise UsageError(f"{path}: archive has no {name}; re-save it with torch.export.save")
    try:
        return json.loads(members[name])
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: {name} is not valid JSON ({type(e).__name__}); re-save it") from None


def _check_pt2_payloads(members: dict[str, bytes], config_file: str, kind: str, path: Path) -> None:
    """A weights/constants config may only name flat tensor files: no pickled tensors, custom or opaque objects."""
    config = _json_member(members, config_file, path)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UsageError(f"{path}: {config_file} is not a payload config; re-save it with torch.export.save")
    for fqn, meta in entries.items():
        name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
        if name.startswith(_PT2_OBJECT_PREFIXES):
            raise UsageError(f"{path}: constant {fqn!r} is a custom or opaque object (unpickled on load, can run "
                             "code); edgec loads only programs whose constants are tensors")
        if not isinstance(meta, dict) or meta.get("use_pickle"):
            raise UsageError(f"{path}: {kind} {fqn!r} is stored pickled (use_pickle), which can run code; "
                             "edgec loads only plain tensors: re-save with plain tensor weights")
        if not name.startswith(_PT2_TENSOR_PREFIX[kind]) or "/" in name or "\\" in name or ".." in name:
            raise UsageError(f"{path}: {kind} {fqn!r} names an unexpected payload {name[:60]!r}; "
                             "re-save it with torch.export.save")


def load_pt2_safely(path: Path) -> Any:
    """An ExportedProgram from a .pt2 archive without unpickling or evaluating anything from it. The archive (a zip)
    is checked before torch is imported: plain tensor weights and constants only, an ATen-only graph and
    shape-arithmetic-only symbols. Sample inputs then load with ``weights_only=True`` (no fallback), and the guard
    code (Python source torch would compile) is dropped."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    data = path.read_bytes()  # read once: every check below and the load see the same bytes
    members = _pt2_members(data, path)
    models = sorted(n for n in members if n.startswith(_PT2_MODELS_DIR) and n.endswith(".json"))
    if len(models) != 1:
        raise UsageError(f"{path} holds {len(models)} programs; edgec loads archives with exactly one "
                         "(torch.export.save of one ExportedProgram)")
    name = models[0][len(_PT2_MODELS_DIR):-len(".json")]
    if f"{_PT2_WEIGHTS_DIR}{name}.pt" in members or f"{_PT2_CONSTANTS_DIR}{name}.pt" in members:
        raise UsageError(f"{path} uses the legacy pickled weights layout, which can run code; "
                         "re-save it with a current torch.export.save")
    _check_pt2_payloads(members, f"{_PT2_WEIGHTS_DIR}{name}_weights_config.json", "weights", path)
    _check_pt2_payloads(members, f"{_PT2_CONSTANTS_DIR}{name}_constants_config.json", "constants", path)
    program = _json_member(members, models[0], path)
    if not isinstance(program, dict):
        raise UsageError(f"{path}: {models[0]} is not an exported program; re-save it with torch.export.save")
    _check_pt2_graph(program, path)
    program["guards_code"] = []  # Python source that ExportedProgram.module() would compile and run

    import torch
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    from torch.export.pt2_archive._package import PT2ArchiveReader, _load_constants, _load_state_dict

    sample: Any = None
    sample_file = f"data/sample_inputs/{name}.pt"
    if sample_file in members:
        try:
            sample = torch.load(io.BytesIO(members[sample_file]), weights_only=True)
        except Exception as e:  # noqa: BLE001 -- weights_only refused an object, or the bytes are corrupt
            raise UsageError(f"{path}: sample inputs are not plain tensors ({type(e).__name__}); edgec never "
                             "unpickles objects from a .pt2: re-save with tensor sample inputs") from None
        if not isinstance(sample, tuple):
            raise UsageError(f"{path}: sample inputs are not a tuple; re-save it with torch.export.save")
    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        state_dict = _load_state_dict(reader, name)  # plain tensors only: checked above
        constants = _load_constants(reader, name)
        serialized = _bytes_to_dataclass(schema.ExportedProgram, json.dumps(program).encode())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, sample)
    except Exception as e:  # noqa: BLE001 -- checked above: what fails here is a malformed or foreign archive
        raise UsageError(f"{path} is not a loadable ExportedProgram ({type(e).__name__}: {_first_line(e)}); "
                         "re-save it with torch.export.save") from None


@contextlib.contextmanager
def _user_model_errors(what: str) -> Iterator[None]:
    """torch.onnx failing on a user's model (an op it cannot export, a data-dependent shape) is a one-line
    UsageError naming the model, not an internal error; edgec's own errors pass through."""
    try:
        yield
    except EdgecError:
        raise
    except Exception as e:  # noqa: BLE001 -- torch.onnx on a user's model
        raise UsageError(f"cannot export {what} to ONNX ({type(e).__name__}: {_first_line(e)}); "
                         "make the model exportable with torch.onnx.export(..., dynamo=True)") from None


def _export_pt2(path: Path, cache: Cache) -> tuple[Artifact, bool]:
    ep = load_pt2_safely(path)  # refuses a hostile archive before torch is imported

    import torch

    with _user_model_errors(str(path)):
        module = ep.module()
        values = [n.meta["val"] for n in ep.graph.nodes
                  if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
        tensors = []
        for val in values:
            shape = tuple(int(d) for d in val.shape)
            check_input_size(shape, f"{path} input")
            tensors.append(torch.zeros(shape, dtype=val.dtype))
        example = tuple(tensors)
        model = torch_to_onnx(ep, example, dynamic_batch=False)
        parity = torch_parity(module, model, tuple(e.numpy() + 0.5 for e in example)) if len(example) == 1 else None
    if parity is not None and not parity.ok():
        raise GateFailure(f"ONNX export of {path} does not match torch: {parity.problem()}")
    sk = StepKey("export:pt2", (sha256_file(path),), {"opset": 18}, EXPORT_VERSION)
    return _store_onnx(cache, sk, model, {"origin": "pt2", "source": str(path),
                                          "parity": parity.to_json() if parity else None})
