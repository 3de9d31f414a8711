"""cleanup: constant folding, dead-node removal, shape inference and fusion-friendly rewrites.

Uses onnxscript's optimizer (constant folding + onnx-ir dead-code elimination + its default
rewrite rules) rather than hand-written graph surgery, then ONNX shape inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from toolchain.passes import PassContext, PassResult


@dataclass(frozen=True)
class Config:
    fold_constants: bool = True
    # Shapes inferred while folding: Shape of a statically shaped tensor folds to a constant, so shape arithmetic
    # (Shape -> Gather -> Slice of a chunked projection) becomes constant attributes importers can take.
    shape_inference_in_folding: bool = True
    rewrite: bool = True  # onnxscript's default fusion-friendly rewrite rules
    infer_shapes: bool = True


def run(model: onnx.ModelProto, cfg: Config, ctx: PassContext | None = None) -> PassResult:
    import onnx_ir as ir
    import onnxscript.optimizer as opt
    import onnxscript.rewriter as rewriter

    before = len(model.graph.node)
    irm = ir.from_proto(model)
    if cfg.fold_constants:
        opt.optimize_ir(irm, num_iterations=2, onnx_shape_inference=cfg.shape_inference_in_folding)
    if cfg.rewrite:
        irm = rewriter.rewrite(irm)
    ir.passes.common.RemoveUnusedNodesPass()(irm)
    out = ir.to_proto(irm)
    if cfg.infer_shapes:
        out = onnx.shape_inference.infer_shapes(out, data_prop=True)
    after = len(out.graph.node)
    return PassResult(out, after != before or cfg.infer_shapes,
                      {"nodes_before": before, "nodes_after": after})
