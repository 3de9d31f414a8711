"""The pass manager: passes run in order, each output a cached artifact, each checked on the way out.

Pre-condition: every pass text parses before any pass runs. Post-conditions: the result passes
``onnx.checker`` (full check) before it is stored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnx

from toolchain.core.cache import Artifact, Cache, StepKey
from toolchain.core.onnx_io import load_onnx
from toolchain.core.profile import Profile
from toolchain.passes import PassContext, PassSpec, config_dict, parse_pass
from toolchain.zoo.datasets import Dataset, load_dataset


def parse_passes(pass_texts: list[str], only_if_faster: bool = False) -> list[tuple[PassSpec, Any]]:
    """Every pass parsed (so a typo fails before any work); ``only_if_faster`` turns that option on for
    every pass that measures."""
    parsed = [parse_pass(t) for t in pass_texts]
    if only_if_faster:
        parsed = [(s, dataclasses.replace(c, only_if_faster=True) if s.measurable else c) for s, c in parsed]
    return parsed


def run_passes(art: Artifact, pass_texts: list[str], cache: Cache, *, profile: Profile | None = None,
               data_dir: Path | None = None, target: str = "ort", data_name: str | None = None,
               only_if_faster: bool = False) -> tuple[Artifact, list[dict[str, Any]]]:
    """Apply passes in order; each is its own cached artifact. ``data_name`` names the labelled set for passes
    that need one (default: the model's own dataset); ``only_if_faster`` turns it on for every pass that has it.
    Passes run per ``target``: a pass may pick a lowering form for, or measure speed on, that target."""
    parsed = parse_passes(pass_texts, only_if_faster)
    reports: list[dict[str, Any]] = []
    data: Dataset | None = None
    for spec, cfg in parsed:
        needs_data = spec.needs_data(cfg)
        if data is None and needs_data:
            name = data_name or art.meta.get("dataset")
            data = load_dataset(name, data_dir) if name else None
        ctx = PassContext(profile=profile, cache=cache, data=data, target=target)
        keyed = {**config_dict(cfg), **({"data": data_name} if data_name and needs_data else {}), "target": target}
        sk = StepKey(f"pass:{spec.name}", (art.key,), keyed, spec.version, profile.id if profile else None)

        def write(d: Path, spec: PassSpec = spec, cfg: Any = cfg, ctx: PassContext = ctx,
                  src: Artifact = art) -> tuple[str, dict[str, Any]]:
            res = spec.fn()(load_onnx(src.payload, check=False), cfg, ctx)
            onnx.checker.check_model(res.model, full_check=True)
            onnx.save_model(res.model, d / "model.onnx")
            return "model.onnx", {**src.meta, "pass": spec.name, "modified": res.modified, "report": res.report}

        art, hit = cache.get_or_build(sk, "onnx", write)
        reports.append({"pass": spec.name, "config": config_dict(cfg), "artifact": art.key, "cache_hit": hit,
                        "modified": art.meta.get("modified"), "report": art.meta.get("report")})
    return art, reports
