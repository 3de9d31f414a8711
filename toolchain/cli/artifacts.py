"""``edgec export | optimize | compile | bench | build | inspect | passes | demo``: the artifact pipeline,
one verb per stage and one for all of them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from targets import get_target
from targets.base import CompileOptions, TuneOptions
from toolchain import api
from toolchain.cli.common import (
    DataDirOpt,
    JsonOpt,
    KeyOpt,
    ProfileOpt,
    TokenOpt,
    TrackerOpt,
    emit,
    get_cache,
    handled,
)
from toolchain.core.errors import UsageError
from toolchain.core.profile import load_profile
from toolchain.core.text import copy_atomic
from toolchain.device.protocol import RemoteSpec, token_from_env
from toolchain.passes import REGISTRY as PASSES
from toolchain.passes.manager import parse_passes
from toolchain.report import (
    render_bench,
    render_build,
    render_fastest,
    render_inspect,
    write_build_reports,
    write_fastest_reports,
)

TuneTrialsOpt = Annotated[int | None, typer.Option(
    help="TVM: MetaSchedule trials. Default: auto -- the profile's tuning.auto_trials (96) when a layer of "
         ">= tuning.auto_min_mflops has no hand-written kernel (e.g. a convolution), 0 otherwise. "
         "0 = hand-written kernels only.", show_default=False)]


def compile_options(tune_trials: int | None, progress: bool) -> CompileOptions:
    return CompileOptions(tune=TuneOptions(trials=tune_trials, progress=progress))


def register(app: typer.Typer) -> None:
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
        art, hit = api.export(model, cache=get_cache(), input_shape=input_shape, weights=weights,
                              data_dir=data_dir, form=form)
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
        cache = get_cache()
        prof = load_profile(profile)
        parse_passes(passes)  # every pass is valid before the input enters the cache
        art, _ = api.import_onnx(model, cache=cache)
        out_art, reports = api.optimize(art, passes, cache=cache, profile=prof, data_dir=data_dir, data=data,
                                        only_if_faster=only_if_faster)
        output = output or model.with_name(model.stem + ".opt.onnx")
        copy_atomic(out_art.payload, output)
        emit({"output": str(output), "artifact": out_art.key, "passes": reports}, as_json,
             lambda: "\n".join([f"{r['pass']}: {r['report']}" for r in reports] + [f"wrote {output}"]))

    @app.command("compile")
    @handled
    def compile_cmd(
        model: Annotated[Path, typer.Argument(help="Input ONNX file.")],
        profile: ProfileOpt,
        target: Annotated[str | None, typer.Option("--target", "-t", help="ort | tvm | tensorrt (default: profile's first available).")] = None,
        tune_trials: TuneTrialsOpt = None,
        for_device: Annotated[bool, typer.Option(
            "--for-device", help="The artifact will run on a remote device that builds its final form itself "
                                 "(tensorrt: the Jetson builds its engine from the ONNX with its own TensorRT); "
                                 "needs no TensorRT or GPU here. Bench it with --tracker.")] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Compile an ONNX model for a device profile; prints the artifact key to bench."""
        cache = get_cache()
        prof = load_profile(profile)
        art, _ = api.import_onnx(model, cache=cache)
        name = target or next((t for t in prof.targets if get_target(t).available() is None), prof.targets[0])
        options = dataclasses.replace(compile_options(tune_trials, not as_json), for_device=for_device)
        out, hit = api.compile(art, profile=prof, target=name, cache=cache, options=options)
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
        tracker: TrackerOpt = None,
        key: KeyOpt = None,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Measure latency and accuracy of a compiled artifact on this machine, or on a device (--tracker)."""
        cache = get_cache()
        art = api.resolve_artifact(artifact, cache=cache)
        remote = RemoteSpec.parse(tracker, key or "", token_from_env(token)) if tracker else None
        res = api.bench(art, cache=cache, data=data, data_dir=data_dir, samples=samples, duration_s=duration,
                        remote=remote)
        emit(res, as_json, lambda: render_bench(res))

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
        samples: Annotated[int | None, typer.Option(help="Test samples for accuracy (0 = all; default 1000, all with --optimize fastest).", show_default=False)] = None,
        duration: Annotated[float | None, typer.Option(help="Seconds of timed runs per target.")] = None,
        report_dir: Annotated[Path | None, typer.Option(help="Also write <name>.json and <name>.md here.")] = None,
        tune_trials: TuneTrialsOpt = None,
        optimize: Annotated[str, typer.Option("--optimize", help="'fastest': build every target x pass chain the profile allows (fp32, int8 dynamic/static, bf16, modular), measure them together and keep the fastest within --max-drop. 'none': only the --target/--pass you name.")] = "none",
        max_drop: Annotated[float, typer.Option("--max-drop", help="With --optimize fastest: the accuracy drop allowed, in points (argmax disagreement without labels).")] = 1.0,
        batch: Annotated[int, typer.Option("--batch", help="Also build each target for this many inputs per call and report its throughput beside the batch-1 latency.")] = 1,
        tracker: TrackerOpt = None,
        key: KeyOpt = None,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Export, optimize, compile and benchmark in one go; one report. With --optimize fastest, edgec chooses the
        target and pass chain for you."""
        if optimize not in ("none", "fastest"):
            raise UsageError(f"--optimize {optimize!r} must be 'none' or 'fastest'")
        if optimize == "fastest":
            if target or passes:
                raise UsageError("--optimize fastest chooses the targets and passes itself; drop --target / --pass")
            remote = RemoteSpec.parse(tracker, key or profile, token_from_env(token)) if tracker else None
            found = api.fastest(model, profile=profile, cache=get_cache(), max_drop=max_drop, data=data,
                                data_dir=data_dir, samples=0 if samples is None else samples, duration_s=duration,
                                remote=remote, options=compile_options(tune_trials, not as_json),
                                input_shape=input_shape, progress=not as_json)
            if report_dir:
                write_fastest_reports(found, report_dir, Path(model).stem.replace(":", "_") + ".fastest")
            emit(found, as_json, lambda: render_fastest(found))
            return
        if tracker:
            raise UsageError("a plain build measures here; pass --tracker with --optimize fastest, or use 'edgec bench'")
        rep = api.build(model, profile=profile, cache=get_cache(), targets=target, passes=passes or [],
                        input_shape=input_shape, data=data, data_dir=data_dir, samples=1000 if samples is None else samples,
                        duration_s=duration,
                        options=compile_options(tune_trials, not as_json), batch=batch, progress=not as_json)
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
        info = api.inspect(file, cache=get_cache(), profile=profile)
        emit(info, as_json, lambda: render_inspect(info))

    @app.command("passes")
    @handled
    def passes_cmd(as_json: JsonOpt = False) -> None:
        """List the available graph passes and their options."""
        rows: list[dict[str, Any]] = []
        for name, spec in PASSES.items():
            opts = {f.name: f.default for f in dataclasses.fields(spec.config_class())}
            rows.append({"name": name, "summary": spec.summary, "options": opts})
        emit(rows, as_json, lambda: "\n".join(
            f"{r['name']:<16} {r['summary']}\n{'':<16} options: "
            + ", ".join(f"{k}={v}" for k, v in r["options"].items()) for r in rows))

    @app.command()
    @handled
    def demo(
        report_dir: Annotated[Path, typer.Option(help="Where to write demo.json and demo.md.")] = Path("reports"),
        as_json: JsonOpt = False,
    ) -> None:
        """The main job: train (or load) mlp-small on Fashion-MNIST, export, cleanup, compile for x86-avx512
        through ort and tvm, benchmark both, print one table, write JSON + markdown reports."""
        rep = api.build("mlp-small", profile="x86-avx512", cache=get_cache(), targets=["ort", "tvm"],
                        passes=["cleanup"], samples=0, progress=not as_json)
        j, m = write_build_reports(rep, report_dir, "demo")
        emit(rep, as_json, lambda: render_build(rep) + f"\n\nreports: {j} {m}")
