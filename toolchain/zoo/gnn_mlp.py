"""GNN-to-MLP distillation on Cora / Citeseer: GCN and GraphSAGE teachers, GLNN and FF-G2M students.

Teachers are plain torch (normalised sparse adjacency matmul, no torch_geometric) and need the whole
graph, so they are training-time only. The deployed model is the student MLP over one node's features
(input 1 x F). GLNN (Zhang et al. 2022): CE on labelled nodes + KL to the teacher's soft labels on all
nodes. FF-G2M (Wu et al. 2023): adds low-frequency KL between a node's prediction and its neighbours'
teacher predictions, and high-frequency distillation of |z_src - z_dst| along edges.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from toolchain.core.errors import UsageError
from toolchain.zoo import TrainContext, ZooEntry
from toolchain.zoo.datasets import Dataset
from toolchain.zoo.datasets.planetoid import GraphDataset
from toolchain.zoo.trained import load_trained

NUM_FEATURES = {"cora": 1433, "citeseer": 3703}
NUM_CLASSES = {"cora": 7, "citeseer": 6}


def _graph(data: Dataset) -> GraphDataset:
    if not isinstance(data, GraphDataset):
        raise UsageError(f"dataset {data.name!r} has no graph; GNN entries train on cora or citeseer")
    return data


def normalized_adjacency(edge_index: np.ndarray, n: int, mean: bool = False) -> torch.Tensor:
    """Sparse D^-1/2 (A + I) D^-1/2 (GCN), or D^-1 A (mean aggregation, GraphSAGE), as a COO tensor."""
    ei = torch.from_numpy(edge_index)
    if not mean:
        loops = torch.arange(n).repeat(2, 1)
        ei = torch.cat([ei, loops], 1)
    deg = torch.zeros(n).index_add_(0, ei[0], torch.ones(ei.shape[1]))
    if mean:
        w = 1.0 / deg.clamp(min=1)[ei[0]]
    else:
        dinv = deg.pow(-0.5)
        w = dinv[ei[0]] * dinv[ei[1]]
    return torch.sparse_coo_tensor(ei, w, (n, n), check_invariants=False).coalesce()


def sparse_linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """``lin(x)`` that exploits sparse bag-of-words features (1 % non-zero) during full-graph training."""
    if x.is_sparse:
        out = torch.sparse.mm(x, lin.weight.t())
        return out + lin.bias if lin.bias is not None else out
    return lin(x)


def sparse_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not x.is_sparse:
        return F.dropout(x, p, training)
    if not training or p == 0:
        return x
    return torch.sparse_coo_tensor(x.indices(), F.dropout(x.values(), p, True), x.shape, check_invariants=False)


def sparse_features(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).to_sparse().coalesce()


class GCN(nn.Module):
    """Two-layer GCN (Kipf & Welling): relu(Â X W1) -> Â H W2."""

    def __init__(self, f_in: int, hidden: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(f_in, hidden), nn.Linear(hidden, classes)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        x = sparse_dropout(x, self.dropout, self.training)
        h = F.relu(torch.sparse.mm(adj, sparse_linear(x, self.lin1)))
        h = F.dropout(h, self.dropout, self.training)
        return torch.sparse.mm(adj, self.lin2(h))


class SAGE(nn.Module):
    """Two-layer GraphSAGE with mean aggregation: W_self h + W_nbr mean(h_nbrs)."""

    def __init__(self, f_in: int, hidden: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.self1, self.nbr1 = nn.Linear(f_in, hidden), nn.Linear(f_in, hidden, bias=False)
        self.self2, self.nbr2 = nn.Linear(hidden, classes), nn.Linear(hidden, classes, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        x = sparse_dropout(x, self.dropout, self.training)
        h = F.relu(sparse_linear(x, self.self1) + torch.sparse.mm(adj, sparse_linear(x, self.nbr1)))
        h = F.dropout(h, self.dropout, self.training)
        return self.self2(h) + torch.sparse.mm(adj, self.nbr2(h))


def build_teacher(recipe: Mapping[str, Any]) -> nn.Module:
    cls = GCN if recipe["arch"] == "gcn" else SAGE
    ds = recipe["dataset"]
    return cls(NUM_FEATURES[ds], recipe["hidden"], NUM_CLASSES[ds], recipe["dropout"])


def teacher_adjacency(recipe: Mapping[str, Any], data: Any) -> torch.Tensor:
    return normalized_adjacency(data.edge_index, data.x_all.shape[0], mean=recipe["arch"] == "sage")


def build_student(recipe: Mapping[str, Any]) -> nn.Module:
    """The deployed model: an MLP over one node's features."""
    ds = recipe["dataset"]
    dims = [NUM_FEATURES[ds], *recipe["hidden"], NUM_CLASSES[ds]]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        if i > 0:
            layers += [nn.ReLU(), nn.Dropout(recipe["dropout"])]
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _acc(logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> float:
    return float((logits[idx].argmax(-1) == y[idx]).float().mean())


def _fit(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any], loss_of: Any, forward: Any) -> dict[str, Any]:
    """Full-batch Adam; keeps the weights with the best validation accuracy (public split protocol)."""
    data = _graph(ctx.data)
    torch.manual_seed(ctx.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny sparse problems: a second thread only adds contention
    y = torch.from_numpy(data.y_all)
    val, test = torch.from_numpy(data.val_idx), torch.from_numpy(data.test_idx)
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    best, best_state, best_epoch = -1.0, None, 0
    start = time.monotonic()
    for epoch in range(recipe["epochs"]):
        model.train()
        loss = loss_of(forward())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            va = _acc(forward(), y, val)
        if va > best:
            best, best_epoch = va, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if ctx.max_seconds is not None and time.monotonic() - start > ctx.max_seconds:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        te = _acc(forward(), y, test)
    torch.set_num_threads(threads)
    return {"test_accuracy": te, "val_accuracy": best, "best_epoch": best_epoch, "epochs": recipe["epochs"],
            "train_seconds": round(time.monotonic() - start, 2)}


def train_teacher(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    data = _graph(ctx.data)
    x, y = sparse_features(data.x_all), torch.from_numpy(data.y_all)
    adj, tr = teacher_adjacency(recipe, data), torch.from_numpy(data.train_idx)
    return _fit(model, ctx, recipe, lambda out: F.cross_entropy(out[tr], y[tr]), lambda: model(x, adj))


def teacher_logits(recipe: Mapping[str, Any], ctx: TrainContext) -> tuple[torch.Tensor, dict[str, Any]]:
    """The teacher's logits on every node, its weights loaded from the caller's cache (trained into it once)."""
    # The student's recipe carries the teacher's, so it alone keys both cached weights.
    entry = dataclasses.replace(TEACHERS[recipe["teacher"]], recipe=dict(recipe["teacher_recipe"]))
    teacher, metrics, _art, _hit = load_trained(entry, ctx.cache, ctx.data_dir, data=ctx.data, seed=ctx.seed,
                                                progress=ctx.progress)
    data = _graph(ctx.data)
    with torch.no_grad():
        return teacher(sparse_features(data.x_all), teacher_adjacency(entry.recipe, data)), metrics


def _kl(t_logits: torch.Tensor, s_logits: torch.Tensor, tau: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(s_logits / tau, -1), F.log_softmax(t_logits / tau, -1), log_target=True,
                    reduction="batchmean") * tau * tau


def train_student(model: nn.Module, ctx: TrainContext, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """mode: 'mlp' (CE only), 'glnn' (CE + KD), 'ffg2m' (CE + KD + low/high-frequency edge distillation)."""
    data = _graph(ctx.data)
    x, y = sparse_features(data.x_all), torch.from_numpy(data.y_all)
    tr = torch.from_numpy(data.train_idx)
    mode = recipe["mode"]
    t_out, t_metrics = teacher_logits(recipe, ctx) if mode != "mlp" else (None, {})
    src, dst = torch.from_numpy(data.edge_index[0]), torch.from_numpy(data.edge_index[1])
    lam, tau = recipe.get("lam", 1.0), recipe.get("tau", 1.0)

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(out[tr], y[tr])
        if t_out is None:
            return ce
        loss = lam * ce + (1 - lam) * _kl(t_out, out, tau)
        if mode == "ffg2m":
            # Low frequency: a node agrees with its neighbours' teacher predictions (smoothness).
            loss = loss + recipe["alpha"] * _kl(t_out[dst], out[src], tau)
            # High frequency: the student's differences along edges follow the teacher's (local detail).
            loss = loss + recipe["beta"] * _kl((t_out[src] - t_out[dst]).abs(), (out[src] - out[dst]).abs(),
                                               recipe.get("tau_hf", 1.0))
        return loss

    first, rest = model[0], model[1:]  # the first Linear runs sparse in training; same function as model(x)
    metrics = _fit(model, ctx, recipe, loss_of, lambda: rest(sparse_linear(x, first)))
    if t_metrics:
        metrics["teacher_test_accuracy"] = t_metrics.get("test_accuracy")
    return metrics


def _no_export(_module: nn.Module, _form: str) -> nn.Module:
    raise UsageError("GNN teachers need the whole graph and are not deployed; export a student "
                     "(glnn-*, ffg2m-*, mlp-*) instead")


TEACHER_RECIPE = {"hidden": 64, "dropout": 0.5, "lr": 0.01, "weight_decay": 5e-4, "epochs": 200}
STUDENT_RECIPE = {"hidden": [256], "dropout": 0.5, "lr": 0.01, "weight_decay": 5e-4, "epochs": 300}
DISTILL = {"glnn": {"lam": 0.2, "tau": 1.0}, "ffg2m": {"lam": 0.2, "tau": 1.0, "alpha": 0.5, "beta": 0.5,
                                                        "tau_hf": 1.0}}


def _teacher_entry(arch: str, ds: str) -> ZooEntry:
    name = f"{arch}-{ds}"
    return ZooEntry(
        name=name, family="gnn", dataset=ds, input_shape=(1, NUM_FEATURES[ds]),
        summary=f"{arch.upper()} teacher on {ds.capitalize()} (public split); training-time only",
        recipe={"arch": arch, "dataset": ds, **TEACHER_RECIPE}, build=build_teacher, train=train_teacher,
        export_module=_no_export, tags=("teacher", "no-export"),
    )


TEACHERS = {e.name: e for e in (_teacher_entry(a, d) for a in ("gcn", "sage") for d in ("cora", "citeseer"))}


def _student_entry(mode: str, ds: str, teacher: str = "gcn") -> ZooEntry:
    recipe: dict[str, Any] = {"mode": mode, "dataset": ds, **STUDENT_RECIPE, **DISTILL.get(mode, {})}
    if mode != "mlp":
        t = TEACHERS[f"{teacher}-{ds}"]
        recipe |= {"teacher": t.name, "teacher_recipe": dict(t.recipe)}
    what = {"mlp": "plain MLP (no teacher)", "glnn": f"GLNN student of {teacher}-{ds}",
            "ffg2m": f"FF-G2M student of {teacher}-{ds}"}[mode]
    return ZooEntry(
        name=f"{mode}-{ds}", family="gnn-mlp", dataset=ds, input_shape=(1, NUM_FEATURES[ds]),
        summary=f"{what}: MLP {NUM_FEATURES[ds]}-{'-'.join(map(str, STUDENT_RECIPE['hidden']))}-{NUM_CLASSES[ds]}"
                " over node features",
        recipe=recipe, build=build_student, train=train_student,
    )


ENTRIES = (*TEACHERS.values(), *(_student_entry(m, d) for d in ("cora", "citeseer") for m in ("mlp", "glnn", "ffg2m")))
