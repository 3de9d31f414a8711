"""The ``edgec`` command. Each command parses options and calls one function of ``toolchain.api``.

Exit codes: 0 ok, 1 a gate failed, 2 usage / input error, 3 SDK, device or data unavailable,
4 internal error (a bug: rerun with --verbose and report it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from toolchain.commands import register_all

app = typer.Typer(
    help="edgec: deploy unconventional networks (sparse modular MLPs, KANs, GNN-distilled MLPs, spiking nets) "
    "to edge devices: export to ONNX with proven parity, compress, compile through TVM / TensorRT / "
    "ONNX Runtime for a device profile, and measure.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
profiles_app = typer.Typer(help="Device profiles (profiles/*.toml).", no_args_is_help=True)
zoo_app = typer.Typer(help="The model zoo: list and train the seed families on real data.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
app.add_typer(zoo_app, name="zoo")

from toolchain.cli_support import STATE, DataDirOpt, JsonOpt, ProfileOpt, emit, handled
from toolchain.cli_support import get_cache as _cache


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Artifact cache (default $EDGEC_CACHE or ~/.cache/edgec).")
    ] = None,
) -> None:
    STATE["verbose"] = verbose
    STATE["cache_dir"] = cache_dir


# ------------------------------------------------------------------------------------------- verbs


@app.command()
@handled
def export(
    model: Annotated[str, typer.Argument(help="Zoo name, .onnx file, .pt2 ExportedProgram, or module:factory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the ONNX file.")],
    input_shape: Annotated[str | None, typer.Option(help="Input shape for module:factory, e.g. 1,784.")] = None,
    weights: Annotated[Path | None, typer.Option(help="state_dict checkpoint for module:factory (weights only).")] = None,
    form: Annotated[str | None, typer.Option(help="Export form, e.g. 'step' for spiking nets.")] = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export MODEL to ONNX, proving numerical parity with torch on ONNX Runtime."""
    from toolchain import api
    from toolchain.report import copy_atomic

    art, hit = api.export(model, _cache(), input_shape, weights, data_dir, form)
    copy_atomic(art.payload, output)
    data = {"output": str(output), "artifact": art.key, "cache_hit": hit, "parity": art.meta.get("parity")}
    emit(data, as_json, lambda: f"wrote {output} (artifact {art.key[:12]}{', cache hit' if hit else ''})"
         + (f"; parity max rel {data['parity']['max_rel']:.1e}" if data["parity"] else ""))


@app.command()
@handled
def optimize(
    model: Annotated[Path, typer.Argument(help="Input ONNX file.")],
    passes: Annotated[list[str], typer.Option("--pass", help="NAME[=key=value,...]; repeat to chain. See 'edgec passes'.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where to write the result.")] = None,
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile the passes optimize for.")] = "x86-avx512",
    data: Annotated[str | None, typer.Option(help="Labelled set for calibration / accuracy control: fashion-mnist, cora, citeseer or an .npz.")] = None,
    only_if_faster: Annotated[bool, typer.Option("--only-if-faster", help="Sparsity passes keep a layer dense unless sparse is measured faster.")] = False,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply graph passes (cleanup, sparsity, quantization) to an ONNX file."""
    from toolchain import api
    from toolchain.export import import_onnx_file
    from toolchain.passes import parse_pass
    from toolchain.profile import load_profile
    from toolchain.report import copy_atomic

    cache = _cache()
    prof = load_profile(profile)
    for p in passes:  # every pass is valid before the input enters the cache
        parse_pass(p)
    art, _ = import_onnx_file(model, cache)
    out_art, reports = api.optimize(art, passes, cache, prof, data_dir, data_name=data, only_if_faster=only_if_faster)
    output = output or model.with_name(model.stem + ".opt.onnx")
    copy_atomic(out_art.payload, output)
    emit({"output": str(output), "artifact": out_art.key, "passes": reports}, as_json,
         lambda: "\n".join([f"{r['pass']}: {r['report']}" for r in reports] + [f"wrote {output}"]))


TuneTrialsOpt = Annotated[int | None, typer.Option(
    help="TVM: MetaSchedule trials. Default: auto -- the profile's tuning.auto_trials (96) when a layer of "
         ">= tuning.auto_min_mflops has no hand-written kernel (e.g. a convolution), 0 otherwise. "
         "0 = hand-written kernels only.", show_default=False)]


@app.command("compile")
@handled
def compile_cmd(
    model: Annotated[Path, typer.Argument(help="Input ONNX file.")],
    profile: ProfileOpt,
    target: Annotated[str | None, typer.Option("--target", "-t", help="ort | tvm | tensorrt (default: profile's first available).")] = None,
    tune_trials: TuneTrialsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compile an ONNX model for a device profile; prints the artifact key to bench."""
    from targets import get_target
    from toolchain import api
    from toolchain.export import import_onnx_file
    from toolchain.profile import load_profile

    cache = _cache()
    prof = load_profile(profile)
    art, _ = import_onnx_file(model, cache)
    name = target or next((t for t in prof.targets if get_target(t).available() is None), prof.targets[0])
    from toolchain.tuning import tuning_scope

    with tuning_scope(tune_trials, progress=not as_json):
        out, hit = api.compile(art, prof, name, cache)
    data = {"artifact": out.key, "kind": out.kind, "target": name, "profile": prof.id, "cache_hit": hit,
            "path": str(out.payload), "meta": out.meta}
    emit(data, as_json, lambda: f"{name} artifact {out.key} ({'cache hit' if hit else 'built'}): {out.payload}")


@app.command()
@handled
def bench(
    artifact: Annotated[str, typer.Argument(help="Compiled artifact key (or prefix) or its cache directory.")],
    data: Annotated[str | None, typer.Option(help="Labelled set: fashion-mnist, cora, citeseer or an .npz with x, y.")] = None,
    data_dir: DataDirOpt = None,
    samples: Annotated[int, typer.Option(help="Test samples for accuracy (0 = all).")] = 1000,
    duration: Annotated[float | None, typer.Option(help="Seconds of timed runs (default: profile's).")] = None,
    tracker: Annotated[str | None, typer.Option("--tracker", help="HOST:PORT of a TVM RPC tracker: run on a device.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Device key at the tracker (with --tracker).")] = None,
    token: Annotated[str | None, typer.Option("--token", help="Device token (default $EDGEC_DEVICE_TOKEN).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure latency and accuracy of a compiled artifact on this machine, or on a device (--tracker)."""
    import os

    from toolchain import api
    from toolchain.remote import RemoteSpec

    cache = _cache()
    art = api.resolve_artifact(artifact, cache)
    remote = RemoteSpec.parse(tracker, key or "", token or os.environ.get("EDGEC_DEVICE_TOKEN")) if tracker else None
    res = api.bench(art, cache, data=data, data_dir=data_dir, samples=samples, duration_s=duration, remote=remote)

    def human() -> str:
        lat, ag = res["latency"], res["agreement"]
        ci = lat.get("ci", {}).get("p50_ms", [float("nan")] * 2)
        s = (f"{res['target']} on {res['profile']} ({res.get('device', 'local')}): p50 {lat['p50_ms'] * 1000:.1f} us "
             f"[95% CI {ci[0] * 1000:.1f}-{ci[1] * 1000:.1f}]  p90 {lat['p90_ms'] * 1000:.1f} us  "
             f"p99 {lat['p99_ms'] * 1000:.1f} us  ({lat['runs']} runs, {lat['threads']} thread, "
             f"{'stable' if lat.get('stable') else 'UNSTABLE'})\n"
             f"vs ONNX Runtime reference: max rel err {ag['max_rel']:.1e}, argmax agreement {ag['argmax_agreement']:.2%}")
        if "accuracy" in res:
            a = res["accuracy"]
            s += f"\naccuracy on {a['dataset']} ({a['samples']}): {a['task_accuracy']:.2%} (reference {a['reference_accuracy']:.2%})"
        if "memory" in res:
            s += (f"\nsize on disk {res['size_bytes'] / 1024:.0f} KiB, runner memory +{res['memory']['runner_rss_delta_mb']:.1f} MB "
                  f"(peak RSS {res['memory']['rss_peak_mb']:.0f} MB)")
        return s

    emit(res, as_json, human)


@app.command()
@handled
def build(
    model: Annotated[str, typer.Argument(help="Zoo name, .onnx file, .pt2, or module:factory.")],
    profile: ProfileOpt,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="Repeat for several; default: all available on the profile.")] = None,
    passes: Annotated[list[str] | None, typer.Option("--pass", help="NAME[=key=value,...]; repeat to chain.")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Input shape for module:factory, e.g. 1,784.")] = None,
    data: Annotated[str | None, typer.Option(help="Labelled set for accuracy (zoo models use their own).")] = None,
    data_dir: DataDirOpt = None,
    samples: Annotated[int, typer.Option(help="Test samples for accuracy (0 = all).")] = 1000,
    duration: Annotated[float | None, typer.Option(help="Seconds of timed runs per target.")] = None,
    report_dir: Annotated[Path | None, typer.Option(help="Also write <name>.json and <name>.md here.")] = None,
    tune_trials: TuneTrialsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export, optimize, compile and benchmark in one go; one report."""
    from toolchain import api
    from toolchain.report import render_build, write_build_reports
    from toolchain.tuning import tuning_scope

    with tuning_scope(tune_trials, progress=not as_json):
        rep = api.build(model, profile, target, passes or [], _cache(), input_shape, data, data_dir, samples,
                        duration, progress=not as_json)
    if report_dir:
        write_build_reports(rep, report_dir, Path(model).stem.replace(":", "_"))
    emit(rep, as_json, lambda: render_build(rep))


@app.command()
@handled
def inspect(
    file: Annotated[str, typer.Argument(help="An .onnx file or a cached artifact key / directory.")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile for coverage checks.")] = "x86-avx512",
    as_json: JsonOpt = False,
) -> None:
    """Describe an ONNX model (ops, params, target coverage) or an artifact (manifest, kernels per layer)."""
    from toolchain import api
    from toolchain.report import table

    info = api.inspect(file, _cache(), profile)

    def human() -> str:
        if "file" in info:
            lines = [f"{info['file']}: {info['params']:,} params, inputs {info['inputs']}",
                     "ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items())]
            for t, c in info["coverage"].items():
                lines.append(f"{t}: " + (c.get("unavailable") or ("all ops supported" if c["complete"]
                                         else f"cannot take {', '.join(c['unsupported'])}")))
            return "\n".join(lines)
        m = info["manifest"]
        lines = [f"artifact {info['artifact']} ({info['kind']}) step {m['step']} profile {m.get('profile')}",
                 f"payload {info['dir']}/{m['payload']}  verified: {info['verified']}"]
        if info.get("kernels"):
            share = lambda k: f"{k['time_share']:.1%} ({k['us_per_run']} us)" if "time_share" in k else ""
            lines += ["", table(["kernel", "origin", "detail", "time share"],
                                [[k["name"], k["origin"], k.get("kernel", ""), share(k)] for k in info["kernels"]])]
        return "\n".join(lines)

    emit(info, as_json, human)


@app.command("passes")
@handled
def passes_cmd(as_json: JsonOpt = False) -> None:
    """List the available graph passes and their options."""
    import dataclasses

    from toolchain.passes import REGISTRY

    rows = []
    for name, spec in REGISTRY.items():
        opts = {f.name: f.default for f in dataclasses.fields(spec.config_class())}
        rows.append({"name": name, "summary": spec.summary, "options": opts})
    emit(rows, as_json, lambda: "\n".join(
        f"{r['name']:<16} {r['summary']}\n{'':<16} options: "
        + ", ".join(f"{k}={v}" for k, v in r["options"].items()) for r in rows))


@profiles_app.command("list")
@handled
def profiles_list(as_json: JsonOpt = False) -> None:
    """List device profiles."""
    from toolchain.profile import all_profiles
    from toolchain.report import table

    profs = all_profiles()
    emit([{"id": p.id, "name": p.name, "targets": list(p.targets), "arch": p.cpu.arch} for p in profs], as_json,
         lambda: table(["id", "arch", "targets", "name"],
                       [[p.id, p.cpu.arch, ",".join(p.targets), p.name] for p in profs]))


@profiles_app.command("show")
@handled
def profiles_show(name: Annotated[str, typer.Argument(help="Profile id.")], as_json: JsonOpt = False) -> None:
    """Show every field of a profile."""
    import dataclasses

    from toolchain.profile import load_profile

    d = dataclasses.asdict(load_profile(name))
    emit(d, as_json, lambda: json.dumps(d, indent=2))


@zoo_app.command("list")
@handled
def zoo_list(as_json: JsonOpt = False) -> None:
    """List zoo models."""
    from toolchain.report import table
    from toolchain.zoo.registry import entries

    es = list(entries().values())
    emit([{"name": e.name, "family": e.family, "dataset": e.dataset, "summary": e.summary,
           "forms": list(e.forms)} for e in es], as_json,
         lambda: table(["name", "family", "dataset", "summary"], [[e.name, e.family, e.dataset, e.summary] for e in es]))


@zoo_app.command("train")
@handled
def zoo_train(
    name: Annotated[str, typer.Argument(help="Zoo model name (edgec zoo list).")],
    data_dir: DataDirOpt = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train a zoo model on its real dataset (cached: a second run loads the weights)."""
    from toolchain.zoo.registry import get_entry
    from toolchain.zoo.trained import load_trained

    entry = get_entry(name)
    _m, metrics, art, hit = load_trained(entry, _cache(), data_dir, seed=seed, progress=not as_json)
    emit({"name": name, "artifact": art.key, "cache_hit": hit, "metrics": metrics}, as_json,
         lambda: f"{name}: {metrics} ({'cache hit' if hit else 'trained'}; weights {art.payload})")


@app.command()
@handled
def demo(
    report_dir: Annotated[Path, typer.Option(help="Where to write demo.json and demo.md.")] = Path("reports"),
    as_json: JsonOpt = False,
) -> None:
    """The main job: train (or load) mlp-small on Fashion-MNIST, export, cleanup, compile for x86-avx512
    through ort and tvm, benchmark both, print one table, write JSON + markdown reports."""
    from toolchain import api
    from toolchain.report import render_build, write_build_reports

    rep = api.build("mlp-small", "x86-avx512", ["ort", "tvm"], ["cleanup"], _cache(), samples=0,
                    progress=not as_json)
    j, m = write_build_reports(rep, report_dir, "demo")
    emit(rep, as_json, lambda: render_build(rep) + f"\n\nreports: {j} {m}")


register_all(app)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
