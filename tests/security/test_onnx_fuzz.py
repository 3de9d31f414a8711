"""Mutated ONNX files (bit flips, truncations, random protobuf field edits of a valid model) through ``edgec
inspect`` and ``edgec compile --target ort``: every case ends with exit 0, 2 or 3 (never 4 "internal error", an
escaped exception, a signal or a hang). Process start-up is seconds here, so a parent that has imported edgec forks
one child per case; the child sets a memory limit (RLIMIT_AS) and an alarm and runs the CLI in-process, through the
same error handler (``toolchain.cli.common.handled``) the installed command uses."""

from __future__ import annotations

import collections
import os
import random
import resource
import signal
import sys
from pathlib import Path

import click
import onnx
import onnxruntime  # noqa: F401 -- imported once here, not in every child
import pytest
from onnx import TensorProto

from cli import app
from tests.fixtures.models import small_cnn, small_mlp
from toolchain.describe import describe_onnx

CASE_SECONDS = 30  # a child past this is a hang
MEMORY_HEADROOM = 2 << 30  # address space a child may add to what the parent already maps
ALLOWED = {0, 2, 3}
TIMEOUT, ESCAPED = -1, 99  # pseudo exit codes: the alarm fired; an exception got past the CLI's handler


def _bit_flips(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncation(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def _field_edit(model: onnx.ModelProto, rng: random.Random) -> bytes:
    """One random edit of a parsed field: op types, names, dims, element types, attributes, opsets, IR version,
    raw data, nodes dropped or repeated."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    node = rng.choice(g.node)
    weird = rng.choice([0, -1, 1, 3, 7, 1 << 31, (1 << 62), -(1 << 40)])
    edit = rng.randrange(14)
    if edit == 0:
        node.op_type = rng.choice(["Foo", "", "Conv", "Gemm", "Loop", "If", "Scan", "Reshape", "Relu", "\u00e9"])
    elif edit == 1 and node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(["", "missing", node.output[0], g.input[0].name])
    elif edit == 2 and g.initializer:
        t = rng.choice(g.initializer)
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = weird
    elif edit == 3 and g.initializer:
        rng.choice(g.initializer).data_type = rng.choice([0, 2, 7, 9, 11, 16, 40, 255])
    elif edit == 4:
        dims = g.input[0].type.tensor_type.shape.dim
        if dims:
            d = dims[rng.randrange(len(dims))]
            if rng.random() < 0.5:
                d.dim_value = weird
            else:
                d.dim_param = rng.choice(["N", "", "batch"])
    elif edit == 5:
        g.input[0].type.tensor_type.elem_type = rng.choice([0, 2, 7, 9, 16, 40])
    elif edit == 6:
        m.opset_import[0].version = rng.choice([0, 1, 5, 7, 12, 99, -3])
    elif edit == 7:
        m.ir_version = rng.choice([0, 1, 2, 3, 11, 99, -1])
    elif edit == 8 and g.initializer:
        t = rng.choice(g.initializer)
        raw = t.raw_data
        t.raw_data = raw[: rng.randrange(len(raw) + 1)] if raw else bytes(rng.randrange(64))
    elif edit == 9:
        del g.node[rng.randrange(len(g.node))]
    elif edit == 10:
        g.node.append(node)
    elif edit == 11:
        a = node.attribute.add()
        a.name = rng.choice(["axis", "kernel_shape", "pads", "strides", "group", "transA"])
        a.type = rng.choice([onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT])
        a.i = weird
        a.ints.extend([weird, 0])
    elif edit == 12:
        g.output[0].name = rng.choice(["", "nowhere", g.input[0].name])
    else:
        vi = g.input.add()
        vi.name = rng.choice(["extra", g.input[0].name, g.initializer[0].name if g.initializer else "w"])
        vi.type.tensor_type.elem_type = TensorProto.FLOAT
    try:
        return m.SerializeToString()
    except Exception:  # noqa: BLE001 -- an edit protobuf itself refuses: fall back to flipping bits
        return _bit_flips(model.SerializeToString(), rng)


def mutant(bases: list[onnx.ModelProto], seed: int) -> tuple[str, bytes]:
    rng = random.Random(seed)
    base = rng.choice(bases)
    kind = ("bit-flip", "truncation", "field-edit")[seed % 3]
    if kind == "field-edit":
        return kind, _field_edit(base, rng)
    data = base.SerializeToString()
    return kind, (_bit_flips if kind == "bit-flip" else _truncation)(data, rng)


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(args: list[str], log: Path) -> int:
    """``edgec ARGS`` in a forked child under a memory limit and an alarm: its exit code, TIMEOUT, ESCAPED, or
    -signal for a child a signal killed."""
    limit = _address_space() + MEMORY_HEADROOM
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = ESCAPED
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # also under pytest's capture
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.alarm(CASE_SECONDS)
            try:  # without standalone mode click returns the code a handled error exits with
                result = app(args, prog_name="edgec", standalone_mode=False)
                code = result if isinstance(result, int) else 0
            except click.exceptions.Exit as e:
                code = e.exit_code
            except click.ClickException as e:
                code = e.exit_code
        except BaseException as e:  # noqa: BLE001 -- past the CLI's handler: the case fails
            print(f"escaped: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return TIMEOUT if os.WTERMSIG(status) == signal.SIGALRM else -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def fuzz(tmp: Path, cases: int, first_seed: int = 0) -> tuple[collections.Counter[str], list[str]]:
    """``cases`` mutants, each through inspect and compile --target ort: a histogram of (verb, exit code) and
    one line per bad case."""
    bases = [small_mlp(dims=(16, 8, 4)), small_cnn()]
    cache = tmp / "cache"
    valid = tmp / "valid.onnx"
    onnx.save(bases[1], valid)
    describe_onnx(valid, "x86-avx512")  # every importer (TVM's too) loaded here once, before the forks
    hist: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    for seed in range(first_seed, first_seed + cases):
        kind, data = mutant(bases, seed)
        f = tmp / f"case{seed % 4}.onnx"
        f.write_bytes(data)
        for verb, args in (("inspect", ["inspect", str(f)]),
                           ("compile", ["compile", str(f), "--profile", "x86-avx512", "--target", "ort"])):
            log = tmp / "case.log"
            code = run_case(["--cache-dir", str(cache), *args], log)
            hist[f"{verb} {code}"] += 1
            text = log.read_text(errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if code not in ALLOWED:
                bad.append(f"seed {seed} ({kind}) {verb}: exit {code}: {(lines or [''])[-1][:200]}")
            elif code != 0 and ("Traceback" in text or len([ln for ln in lines if "edgec: error" in ln]) != 1):
                bad.append(f"seed {seed} ({kind}) {verb}: exit {code} without one error line: {text[:200]!r}")
    return hist, bad


def test_onnx_fuzz(tmp_path: Path) -> None:
    hist, bad = fuzz(tmp_path, 200)
    print(dict(sorted(hist.items())))
    assert not bad, "\n".join(bad[:20])


@pytest.mark.slow
def test_onnx_fuzz_thousands(tmp_path: Path) -> None:
    hist, bad = fuzz(tmp_path, 3000, first_seed=100_000)
    print(dict(sorted(hist.items())))
    assert not bad, "\n".join(bad[:20])
