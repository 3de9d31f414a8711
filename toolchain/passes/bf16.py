"""bf16: the fp16 pass with bfloat16 as the half type.

On the tvm target (``form=auto``) it stores the weights of MatMul / Gemm / Conv as bfloat16 and computes in
float32 (TVM's kernels keep such weights as bf16 in memory, half the bytes, and accumulate in fp32); on
tensorrt it is the compute form (bf16 activations too). ONNX Runtime's CPU provider has no bfloat16 MatMul:
the compute form is not for ort.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.passes import fp16
from toolchain.passes.fp16 import run as run  # the pass function is fp16's, run with this Config


@dataclass(frozen=True)
class Config(fp16.Config):
    dtype: str = "bfloat16"
