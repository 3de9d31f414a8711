"""modular: lower block-structured sparse MatMuls to a gather + grouped (batched) matmul.

A G2GNet-style layer splits its outputs into G groups; every output of group g reads the same set S_g of
inputs (its own input group plus a few foreign inputs). Stored as a dense matrix, ~75 % of the multiply
work is on zeros. The structure is detected from the weight's zero pattern alone (any model): outputs are
cut into G contiguous equal groups, S_g = inputs with a nonzero weight into group g, K = max |S_g|. The
layer becomes::

    Gather(x, idx[G, 1, K], axis=-1) -> [B, G, 1, K]  @  W[G, K, out/G]  -> [B, G, 1, out/G] -> Reshape [B, out]

with shorter groups padded to K by zero weight rows (exact). Groups need not be contiguous: outputs are
also grouped greedily by shared inputs (G2GNet's interleaved "mixer" grouping), and a final Gather puts
the outputs back in their original order (or, where the layer feeds one next dense layer, that layer's
input rows and this layer's bias are permuted instead, so no Gather is needed). A layer is left alone when K/in would
not pay (``max_ratio``) or, with ``only_if_faster``, when the lowered form is not measured faster on the target.

On target ``tvm`` the form is ``take``: the kernel substitution (``kernels.tvm.passes.densify_grouped``)
turns each Gather + batched MatMul back into one grouped-GEMV call with the bias and ReLU fused, so a
lowered layer is one kernel (benchmarks/bench_passes.py measures it against the dense masked network).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from toolchain.core.onnx_io import fix_batch
from toolchain.passes import PassContext, PassResult
from toolchain.passes._graph import (
    DenseLayer,
    consumers,
    copy_model,
    get_weight,
    initializers,
    remove_initializer,
    require_layers,
    select,
    set_initializer,
    set_weight,
)
from toolchain.passes._speed import check_target, measure_into, single_layer_model
from toolchain.passes.structured import find_chains


@dataclass(frozen=True)
class Config:
    max_groups: int = 64  # largest G tried (G must divide the output width)
    max_ratio: float = 0.6  # lower only when K / in <= this (gather + batching overhead must be repaid)
    layers: tuple[str, ...] = ()
    measure: bool = False
    only_if_faster: bool = False
    gather: str = "auto"  # auto (elements on ort, take elsewhere) | take | elements
    batch1: bool = False  # pin the model's batch to 1 (edge deployment): constant gather indices, fewer ops

    def __post_init__(self) -> None:
        if self.gather not in ("auto", "take", "elements"):
            raise ValueError(f"gather must be auto, take or elements, got {self.gather!r}")


@dataclass(frozen=True)
class Blocks:
    groups: int
    k: int
    idx: np.ndarray  # [G, K] int64 input columns per group (padded)
    w: np.ndarray  # [G, K, out/G] float32 (zero rows where padded)
    perm: np.ndarray | None = None  # lowered output p is original output perm[p]; None = identity


def _partition(sup: np.ndarray, g: int) -> np.ndarray:
    """Outputs grouped into g equal groups of similar support (greedy on shared inputs): a permutation.
    Finds interleaved / permuted groups (e.g. G2GNet's "mixer" grouping) that contiguous cuts miss."""
    n_out = sup.shape[0]
    n = n_out // g
    f = sup.astype(np.float32)
    overlap = f @ f.T  # [out, out] shared inputs
    free = np.ones(n_out, dtype=bool)
    order = []
    for _ in range(g):
        j = int(np.flatnonzero(free)[0])
        score = np.where(free, overlap[j], -1.0)
        pick = np.sort(np.argsort(-score, kind="stable")[:n])
        free[pick] = False
        order.append(pick)
    return np.concatenate(order)


def _k_of(nz: np.ndarray, perm: np.ndarray, g: int) -> int:
    n_in, n_out = nz.shape
    return int(nz[:, perm].reshape(n_in, g, n_out // g).any(axis=2).sum(0).max())


def detect(w: np.ndarray, max_groups: int = 64) -> Blocks | None:
    """The block structure of an [in, out] weight with the fewest groups reaching the minimal K (None if dense)."""
    nz = w != 0
    n_in, n_out = w.shape
    ident = np.arange(n_out)
    cands: list[tuple[int, int, np.ndarray]] = []  # (K, G, output permutation)
    for g in range(1, min(max_groups, n_out) + 1):
        if n_out % g:
            continue
        k, perm = _k_of(nz, ident, g), ident
        if g > 1 and k > 0:
            p2 = _partition(nz.T, g)
            k2 = _k_of(nz, p2, g)
            if k2 < k:
                k, perm = k2, p2
        cands.append((k, g, perm))
    kmin = min(c[0] for c in cands)
    # Fewest groups within 5 % of the minimal K: more groups only add per-group overhead.
    k, g, perm = min((c for c in cands if c[0] <= kmin * 1.05), key=lambda c: c[1])
    if k >= n_in or k == 0:
        return None
    n = n_out // g
    idx = np.zeros((g, k), dtype=np.int64)
    wg = np.zeros((g, k, n), dtype=np.float32)
    wp = w[:, perm]
    for j in range(g):
        cols = wp[:, j * n:(j + 1) * n]
        rows = np.flatnonzero((cols != 0).any(axis=1))
        idx[j, :len(rows)] = rows
        if len(rows) < k:
            idx[j, len(rows):] = rows[-1] if len(rows) else 0  # any valid column; its weight rows are zero
        wg[j, :len(rows)] = cols[rows]
    return Blocks(g, k, idx, wg, None if np.array_equal(perm, ident) else perm)


def lowered_nodes(x: str, y: str, b: Blocks, prefix: str, bias: str | None, gather: str = "take",
                  static_batch: int | None = None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing y = x @ W (+ bias) from the block form; x is [B, in].

    ``gather="take"``: Gather(x, idx[G, 1, K], axis=-1), the form TVM's grouped-GEMV pattern recognises.
    ``gather="elements"``: GatherElements with the indices expanded to the batch, then a Reshape. Same
    result; ONNX Runtime's Gather copies element by element along the last axis (~2.7 ns per element,
    as much as the grouped matmul itself), its GatherElements is ~6x faster."""
    g, k, n = b.w.shape
    inits = [numpy_helper.from_array(b.w, f"{prefix}/wg"),
             numpy_helper.from_array(np.array([-1, g * n], dtype=np.int64), f"{prefix}/shape")]
    mm_out = f"{prefix}/flat" if bias else y
    flat = f"{prefix}/permuted" if b.perm is not None else mm_out
    if gather == "elements" and static_batch:  # indices for the known batch: no Shape/Concat/Expand at run time
        inits += [numpy_helper.from_array(np.tile(b.idx.reshape(1, g * k), (static_batch, 1)), f"{prefix}/idx"),
                  numpy_helper.from_array(np.array([-1, g, 1, k], dtype=np.int64), f"{prefix}/shape4")]
        nodes = [helper.make_node("GatherElements", [x, f"{prefix}/idx"], [f"{prefix}/xf"], axis=1,
                                  name=f"{prefix}/gather"),
                 helper.make_node("Reshape", [f"{prefix}/xf", f"{prefix}/shape4"], [f"{prefix}/xg"],
                                  name=f"{prefix}/split")]
    elif gather == "elements":
        inits += [numpy_helper.from_array(b.idx.reshape(1, g * k), f"{prefix}/idx"),
                  numpy_helper.from_array(np.array([g * k], dtype=np.int64), f"{prefix}/width"),
                  numpy_helper.from_array(np.array([-1, g, 1, k], dtype=np.int64), f"{prefix}/shape4")]
        nodes = [helper.make_node("Shape", [x], [f"{prefix}/batch"], start=0, end=1, name=f"{prefix}/batch"),
                 helper.make_node("Concat", [f"{prefix}/batch", f"{prefix}/width"], [f"{prefix}/ishape"], axis=0,
                                  name=f"{prefix}/ishape"),
                 helper.make_node("Expand", [f"{prefix}/idx", f"{prefix}/ishape"], [f"{prefix}/idx_b"],
                                  name=f"{prefix}/expand"),
                 helper.make_node("GatherElements", [x, f"{prefix}/idx_b"], [f"{prefix}/xf"], axis=1,
                                  name=f"{prefix}/gather"),
                 helper.make_node("Reshape", [f"{prefix}/xf", f"{prefix}/shape4"], [f"{prefix}/xg"],
                                  name=f"{prefix}/split")]
    else:
        inits.append(numpy_helper.from_array(b.idx.reshape(g, 1, k), f"{prefix}/idx"))
        nodes = [helper.make_node("Gather", [x, f"{prefix}/idx"], [f"{prefix}/xg"], axis=-1, name=f"{prefix}/gather")]
    nodes += [helper.make_node("MatMul", [f"{prefix}/xg", f"{prefix}/wg"], [f"{prefix}/yg"], name=f"{prefix}/bmm"),
              helper.make_node("Reshape", [f"{prefix}/yg", f"{prefix}/shape"], [flat], name=f"{prefix}/reshape")]
    if b.perm is not None:  # groups were found in permuted output order: put outputs back in place
        inv = np.argsort(b.perm).astype(np.int64)
        inits.append(numpy_helper.from_array(inv, f"{prefix}/unpermute"))
        nodes.append(helper.make_node("Gather", [flat, f"{prefix}/unpermute"], [mm_out], axis=-1,
                                      name=f"{prefix}/unpermute"))
    if bias:
        nodes.append(helper.make_node("Add", [mm_out, bias], [y], name=f"{prefix}/bias"))
    return nodes, inits


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def _batch(model: onnx.ModelProto, name: str) -> int | None:
    """The static leading dim of a value, if shape inference knows it."""
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.name == name and vi.type.tensor_type.HasField("shape") and vi.type.tensor_type.shape.dim:
            d = vi.type.tensor_type.shape.dim[0]
            return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
    return None


def timing_models(w: np.ndarray, b: Blocks, gather: str = "take") -> tuple[onnx.ModelProto, onnx.ModelProto]:
    dense = single_layer_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")],
                               "x", w.shape[0], "y")
    nodes, inits = lowered_nodes("x", "y", b, "m", None, gather)
    return dense, single_layer_model(nodes, inits, "x", w.shape[0], "y")


def _fold_permutations(model: onnx.ModelProto, plans: list[tuple[DenseLayer, Blocks]]
                       ) -> list[tuple[DenseLayer, Blocks]]:
    """Where a regrouped layer feeds (bias, elementwise activations) exactly one next dense layer, leave
    its outputs in group order and permute the bias and the next layer's inputs instead: no un-permute
    Gather at run time. Edits ``model``'s initializers in place."""

    chains = {c.a.node.output[0]: c for c in find_chains(model)}
    uses = consumers(model)
    at = {ly.node.output[0]: i for i, (ly, _) in enumerate(plans)}
    plans = list(plans)
    for i, (ly, b) in enumerate(plans):
        c = chains.get(ly.node.output[0])
        if b.perm is None or c is None or (c.bias and len(uses.get(c.bias, [])) != 1):
            continue
        if c.bias:
            set_initializer(model, c.bias, numpy_helper.to_array(initializers(model)[c.bias])[b.perm])
        j = at.get(c.b.node.output[0])
        if j is not None:  # the next layer is lowered too: its gather reads the permuted positions
            nb = plans[j][1]
            plans[j] = (plans[j][0], dataclasses.replace(nb, idx=np.argsort(b.perm)[nb.idx]))
        else:
            set_weight(model, c.b, get_weight(model, c.b)[b.perm])
        plans[i] = (ly, dataclasses.replace(b, perm=None))
    return plans


def run(model: onnx.ModelProto, cfg: Config, ctx: PassContext | None = None) -> PassResult:
    ctx = ctx or PassContext()
    check_target(ctx.target, cfg.measure, cfg.only_if_faster, "modular")
    form = cfg.gather if cfg.gather != "auto" else ("elements" if ctx.target == "ort" else "take")
    out = fix_batch(model, 1) if cfg.batch1 else copy_model(model)
    inferred = onnx.shape_inference.infer_shapes(out)
    layers = select(require_layers(out, "modular"), cfg.layers)
    rows: list[dict[str, Any]] = []
    plans: list[tuple[DenseLayer, Blocks]] = []
    for ly in layers:
        w = get_weight(out, ly)
        row: dict[str, Any] = {"layer": ly.name, "shape": list(w.shape),
                               "density": round(float(np.count_nonzero(w)) / w.size, 4)}
        b = detect(w, cfg.max_groups)
        rank = _rank(inferred, ly.node.input[0])
        why = None
        if b is None:
            why = "no block structure (every group reads every input)"
        elif b.k / w.shape[0] > cfg.max_ratio:
            why = f"K/in = {b.k}/{w.shape[0]} > max_ratio {cfg.max_ratio}: would not pay"
        elif rank != 2:
            why = f"input rank {rank} (only [batch, in] inputs are lowered)"
        if b is not None:
            row.update(groups=b.groups, k=b.k, padded_density=round(b.k * w.shape[1] / w.size, 4),
                       output_permuted=b.perm is not None)
        if why is None and (cfg.measure or cfg.only_if_faster) and measure_into(row, *timing_models(w, b, form),
                                                                                 w.shape[0], cfg, ctx):
            why = f"lowered form not faster on {ctx.target} (ratio {row['speedup']})"
        if why is None:
            plans.append((ly, b))
            rows.append({**row, "applied": True})
        else:
            rows.append({**row, "applied": False, "why": why})
    if plans:
        plans = _fold_permutations(out, plans)
        replace = {ly.index: (ly, b) for ly, b in plans}
        new_nodes: list[onnx.NodeProto] = []
        for i, n in enumerate(out.graph.node):
            if i not in replace:
                keep = onnx.NodeProto()
                keep.CopyFrom(n)
                new_nodes.append(keep)
                continue
            ly, b = replace[i]
            nodes, inits = lowered_nodes(n.input[0], n.output[0], b, f"modular{i}", ly.bias, form,
                                         _batch(inferred, n.input[0]))
            new_nodes.extend(nodes)
            out.graph.initializer.extend(inits)
        for ly, _ in plans:
            remove_initializer(out, ly.weight)
        del out.graph.node[:]
        out.graph.node.extend(new_nodes)
        del out.graph.value_info[:]
        out = onnx.shape_inference.infer_shapes(out)
    return PassResult(out, bool(plans), {"layers": rows, "target": ctx.target, "gather": form})
