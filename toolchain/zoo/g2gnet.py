"""G2GNet: an ensemble-to-ensemble sparse modular MLP with dynamic sparse training (DST).

Hidden neurons are split into G groups. A layer's mask is dense inside a group and sparse across
groups. Two cross-group granularities:

- ``"column"`` (default): each OUTPUT group listens to the same number ``k`` of foreign INPUT
  neurons, shared by all of its rows. Per group the layer is then dense over (own inputs + k foreign
  inputs), so a compiler lowers it to Gather + batched MatMul (see ``G2GLinear.layout``).
- ``"weight"``: every cross-group weight is an independent draw (the literal reading).

Masks, row scales and group assignments are buffers; forward is ``x @ (W*mask*scale).T + b`` with
nothing data-dependent. Rewiring (``G2GRewirer``) runs only between optimizer steps, and
``G2GNet.folded()`` bakes mask and scale into constant weights for export.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.mlp import build_mlp
from toolchain.zoo.training import limited_context, single_thread, train_classifier

GROUPINGS = ("index", "mixer", "random")
GRANULARITIES = ("column", "weight")


def group_assignment(n: int, groups: int, mode: str, layer_index: int, gen: torch.Generator) -> torch.Tensor:
    """Group id of each of ``n`` neurons. Mixer alternates contiguous / interleaved grouping by layer."""
    contiguous = torch.arange(n) * groups // n
    if mode == "index" or (mode == "mixer" and layer_index % 2 == 0):
        return contiguous
    if mode == "mixer":
        return torch.arange(n) % groups
    if mode == "random":
        return contiguous[torch.randperm(n, generator=gen)]
    raise ValueError(f"grouping must be one of {GROUPINGS}, not {mode!r}")


class G2GLinear(nn.Module):
    """A masked linear layer whose mask is dense within groups and sparse across them."""

    def __init__(self, in_groups: torch.Tensor, out_groups: torch.Tensor, groups: int, *, p_intra: float,
                 foreign: int, granularity: str, gen: torch.Generator) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
        self.groups, self.granularity = groups, granularity
        n_in, n_out = len(in_groups), len(out_groups)
        self.in_features, self.out_features = n_in, n_out
        ref = nn.Linear(n_in, n_out)  # nn.Linear's init, so dense and sparse start alike
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())
        self.register_buffer("in_group", in_groups.clone())
        self.register_buffer("out_group", out_groups.clone())
        self.register_buffer("mask", self._init_mask(p_intra, foreign, gen))
        self.register_buffer("scale", torch.ones(n_out, 1))
        self.refresh_scale()

    def same_group(self) -> torch.Tensor:
        return self.out_group[:, None] == self.in_group[None, :]

    def _init_mask(self, p_intra: float, foreign: int, gen: torch.Generator) -> torch.Tensor:
        mask = torch.zeros(self.out_features, self.in_features)
        same = self.same_group()
        if self.granularity == "weight":
            intra = same & (torch.rand(mask.shape, generator=gen) < p_intra)
            cand = (~same).flatten().nonzero().squeeze(1)
            pick = cand[torch.randperm(len(cand), generator=gen)[:foreign]]
            mask.view(-1)[pick] = 1.0
            return mask + intra.float()
        for g in range(self.groups):
            rows = (self.out_group == g).nonzero().squeeze(1)
            own = (self.in_group == g).nonzero().squeeze(1)
            other = (self.in_group != g).nonzero().squeeze(1)
            own = own[torch.randperm(len(own), generator=gen)[: round(p_intra * len(own))]]
            cols = torch.cat([own, other[torch.randperm(len(other), generator=gen)[:foreign]]])
            mask[rows[:, None], cols[None, :]] = 1.0
        return mask

    @torch.no_grad()
    def refresh_scale(self) -> None:
        """Rows rescaled by sqrt(fan_in / active fan_in) so sparse rows keep a dense row's variance."""
        active = self.mask.sum(1, keepdim=True).clamp(min=1.0)
        self.scale.copy_(torch.sqrt(self.in_features / active))

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.mask * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def sparsity(self) -> float:
        return 1.0 - float(self.mask.mean())

    def layout(self) -> list[tuple[list[int], list[int]]]:
        """Per output group: (row indices, sorted active input columns). Exact in column mode."""
        out = []
        for g in range(self.groups):
            rows = (self.out_group == g).nonzero().squeeze(1)
            cols = (self.mask[rows].sum(0) > 0).nonzero().squeeze(1)
            out.append((rows.tolist(), cols.tolist()))
        return out


class FoldedG2GLinear(nn.Module):
    """Export form of a G2GLinear: mask and scale folded into one constant weight (zeros off-mask)."""

    def __init__(self, layer: G2GLinear) -> None:
        super().__init__()
        self.register_buffer("weight", layer.effective_weight().detach().clone())
        self.register_buffer("bias", layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class G2GNet(nn.Module):
    """784 -> hidden (G2G sparse layers, ReLU) -> 10 dense readout."""

    def __init__(self, recipe: Mapping[str, Any]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(int(recipe.get("mask_seed", 0)))
        groups, dims = int(recipe["groups"]), [784, *recipe["hidden"]]
        n_sparse = sum(a * b for a, b in itertools.pairwise(dims))
        n_dense = dims[-1] * 10
        # Cap the cross-group density so the WHOLE net (dense readout included) stays >= min_sparsity.
        density = ((1 - recipe["min_sparsity"]) * (n_sparse + n_dense) - n_dense) / n_sparse
        assigns = [group_assignment(n, groups, recipe["grouping"], i, gen) for i, n in enumerate(dims)]
        layers = []
        for a, b, ga, gb in zip(dims[:-1], dims[1:], assigns[:-1], assigns[1:], strict=True):
            max_own = max(int((ga == g).sum()) for g in range(groups))
            if recipe["granularity"] == "column":
                want = round(recipe["p_inter"] * (a - max_own))
                cap = math.floor(density * a - recipe["p_intra"] * max_own)
            else:
                n_intra = int((gb[:, None] == ga[None, :]).sum())
                want = round(recipe["p_inter"] * (a * b - n_intra))
                cap = math.floor(density * a * b - recipe["p_intra"] * n_intra)
            layers.append(G2GLinear(ga, gb, groups, p_intra=recipe["p_intra"], foreign=max(0, min(want, cap)),
                                    granularity=recipe["granularity"], gen=gen))
        self.sparse = nn.ModuleList(layers)
        self.readout = nn.Linear(dims[-1], 10)
        self.record = False  # set by the rewirer: keep the next batch's activations for scoring
        self.acts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        record = self.training and self.record
        if record:
            self.acts = []
        for layer in self.sparse:
            h = torch.relu(layer(x))
            if record:
                self.acts.append((x.detach(), h.detach()))
            x = h
        return self.readout(x)

    def weight_counts(self) -> tuple[int, int]:
        """(nonzero weights, total weights) over all weight matrices, readout included."""
        nnz = sum(int(layer.mask.sum()) for layer in self.sparse) + self.readout.weight.numel()
        total = sum(layer.mask.numel() for layer in self.sparse) + self.readout.weight.numel()
        return nnz, total

    def sparsity(self) -> float:
        nnz, total = self.weight_counts()
        return 1.0 - nnz / total

    def folded(self) -> nn.Module:
        """The export form: constant folded weights, no masks, no rewiring state."""
        mods: list[nn.Module] = []
        for layer in self.sparse:
            mods += [FoldedG2GLinear(layer), nn.ReLU()]
        readout = nn.Linear(self.readout.in_features, 10)
        readout.load_state_dict(self.readout.state_dict())
        return nn.Sequential(*mods, readout).eval()


def _standardize(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean(0)) / (t.std(0) + 1e-5)


class G2GRewirer:
    """Dynamic sparse training: every ``every`` steps prune a fraction of cross-group connections and
    regrow as many elsewhere, at the layer's granularity. The active count never changes, so the
    sparsity stays exactly where initialisation put it (>= min_sparsity)."""

    def __init__(self, model: G2GNet, *, every: int, fraction: float, prune: str, regrow: str,
                 stop_step: int, seed: int = 0) -> None:
        if prune not in ("magnitude", "hebbian") or regrow not in ("correlation", "random"):
            raise ValueError("prune must be magnitude|hebbian and regrow correlation|random")
        self.model, self.every, self.fraction = model, every, fraction
        self.prune, self.regrow, self.stop_step = prune, regrow, stop_step
        self.gen = torch.Generator().manual_seed(seed)
        self.rewired = 0  # connections moved so far (reported in metrics)

    def __call__(self, step: int) -> None:
        if self.every <= 0 or step > self.stop_step:
            return
        self.model.record = (step + 1) % self.every == 0
        if step % self.every == 0 and self.model.acts:
            self.rewire(step)
            self.model.acts = []

    @torch.no_grad()
    def rewire(self, step: int) -> None:
        frac = self.fraction * 0.5 * (1 + math.cos(math.pi * step / max(self.stop_step, 1)))
        for layer, (pre, post) in zip(self.model.sparse, self.model.acts, strict=True):
            corr = (_standardize(post).T @ _standardize(pre)).abs() / len(pre)  # (out, in)
            keep = (layer.weight * layer.scale).abs() if self.prune == "magnitude" else corr
            if layer.granularity == "column":
                self._rewire_columns(layer, keep, corr, frac)
            else:
                self._rewire_weights(layer, keep, corr, frac)
            layer.refresh_scale()

    def _pick_new(self, cand: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
        if self.regrow == "random":
            return cand[torch.randperm(len(cand), generator=self.gen)[:n]]
        return cand[score.topk(n).indices]

    def _rewire_columns(self, layer: G2GLinear, keep: torch.Tensor, corr: torch.Tensor, frac: float) -> None:
        for g in range(layer.groups):
            rows = (layer.out_group == g).nonzero().squeeze(1)
            foreign = layer.in_group != g
            active = (layer.mask[rows].sum(0) > 0) & foreign
            act_idx = active.nonzero().squeeze(1)
            cand = (foreign & ~active).nonzero().squeeze(1)
            n = min(int(frac * len(act_idx)), len(cand))
            if n == 0:
                continue
            # Column scores aggregate the per-weight scores over the group's rows.
            drop = act_idx[keep[rows][:, act_idx].sum(0).topk(n, largest=False).indices]
            grow = self._pick_new(cand, corr[rows][:, cand].sum(0), n)
            layer.mask[rows[:, None], drop[None, :]] = 0.0
            layer.mask[rows[:, None], grow[None, :]] = 1.0
            layer.weight[rows[:, None], grow[None, :]] = 0.0  # regrown connections start at zero
            self.rewired += n * len(rows)

    def _rewire_weights(self, layer: G2GLinear, keep: torch.Tensor, corr: torch.Tensor, frac: float) -> None:
        foreign = ~layer.same_group()
        m, w = layer.mask.view(-1), layer.weight.view(-1)
        act_idx = ((m > 0) & foreign.view(-1)).nonzero().squeeze(1)
        cand = ((m == 0) & foreign.view(-1)).nonzero().squeeze(1)
        n = min(int(frac * len(act_idx)), len(cand))
        if n == 0:
            return
        drop = act_idx[keep.view(-1)[act_idx].topk(n, largest=False).indices]
        grow = self._pick_new(cand, corr.reshape(-1)[cand], n)
        m[drop], m[grow], w[grow] = 0.0, 1.0, 0.0
        self.rewired += n


def dense_match_hidden(recipe: Mapping[str, Any]) -> int:
    """Width h of a dense 784-h-...-h-10 MLP with the G2GNet's number of nonzero weights."""
    nnz, _ = G2GNet(recipe).weight_counts()
    depth = len(recipe["hidden"])
    # (depth-1) h^2 + (784 + 10) h - nnz = 0
    a, b = depth - 1, 794
    h = (-b + math.sqrt(b * b + 4 * a * nnz)) / (2 * a) if a else nnz / b
    return round(h)


# ---------------------------------------------------------------------------------------------
# Zoo entries


def build_g2gnet(recipe: Mapping[str, Any]) -> nn.Module:
    return G2GNet(recipe)


def train_g2gnet(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    assert isinstance(model, G2GNet)
    ctx = limited_context(ctx, recipe)
    steps = recipe["epochs"] * math.ceil(len(ctx.data.x_train) / recipe["batch"])
    rewirer = G2GRewirer(model, every=recipe["dst_every"], fraction=recipe["dst_fraction"], prune=recipe["prune"],
                         regrow=recipe["regrow"], stop_step=int(recipe["dst_stop"] * steps), seed=ctx.seed)
    with single_thread():
        metrics = train_classifier(model, ctx, epochs=recipe["epochs"], lr=recipe["lr"], batch=recipe["batch"],
                                   on_step=rewirer, desc=f"g2gnet {recipe['grouping']}/{recipe['granularity']}")
    model.record, model.acts = False, []
    nnz, total = model.weight_counts()
    metrics.update(sparsity=round(model.sparsity(), 4), nonzero_weights=nnz, total_weights=total,
                   params=nnz + sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias")),
                   rewired_connections=rewirer.rewired)
    return metrics


def build_dense(recipe: Mapping[str, Any]) -> nn.Module:
    return build_mlp(recipe)


def train_dense(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    with single_thread():
        metrics = train_classifier(model, limited_context(ctx, recipe), epochs=recipe["epochs"], lr=recipe["lr"],
                                   batch=recipe["batch"], desc=f"dense-match {recipe['hidden']}")
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    metrics.update(sparsity=0.0, nonzero_weights=weights, total_weights=weights,
                   params=sum(p.numel() for p in model.parameters()))
    return metrics


def _export_folded(module: nn.Module, form: str) -> nn.Module:
    return module.folded() if isinstance(module, G2GNet) else module


G2G_RECIPE: dict[str, Any] = {
    "hidden": [512, 512], "groups": 8, "p_intra": 1.0, "p_inter": 0.15, "grouping": "mixer",
    "granularity": "column", "min_sparsity": 0.75, "mask_seed": 0,
    "dst_every": 200, "dst_fraction": 0.2, "dst_stop": 0.75, "prune": "magnitude", "regrow": "correlation",
    "epochs": 12, "lr": 2e-3, "batch": 128,
}


def _g2g_entry(name: str, summary: str, **over: Any) -> ZooEntry:
    return ZooEntry(name=name, family="g2gnet", summary=summary, dataset="fashion-mnist", input_shape=(1, 784),
                    recipe={**G2G_RECIPE, **over}, build=build_g2gnet, train=train_g2gnet,
                    export_module=_export_folded, tags=("sparse", "modular"))


def _dense_entry() -> ZooEntry:
    h = dense_match_hidden(G2G_RECIPE)
    recipe = {"hidden": [h] * len(G2G_RECIPE["hidden"]),
              **{k: G2G_RECIPE[k] for k in ("epochs", "lr", "batch")}}
    return ZooEntry(name="g2gnet-dense-match", family="g2gnet",
                    summary=f"dense 784-{h}-{h}-10 MLP with g2gnet's nonzero weight count (baseline)",
                    dataset="fashion-mnist", input_shape=(1, 784), recipe=recipe, build=build_dense,
                    train=train_dense, tags=("baseline",))


ENTRIES = (
    _g2g_entry("g2gnet", "G2GNet 784-512-512-10, 8 groups, mixer grouping, column-granular DST, >=75% sparse"),
    _g2g_entry("g2gnet-weight", "G2GNet with per-weight cross-group sparsity (literal reading)",
               granularity="weight"),
    _dense_entry(),
)
