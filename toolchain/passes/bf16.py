"""bf16: the fp16 pass with bfloat16 as the half type (TVM / TensorRT targets; not ORT CPU)."""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.passes import fp16
from toolchain.passes.fp16 import run as run  # the pass function is fp16's, run with this Config


@dataclass(frozen=True)
class Config(fp16.Config):
    dtype: str = "bfloat16"
