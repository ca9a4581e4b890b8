"""Non-neural baselines on the same split, masking and ranking code as the two-tower model.

- Popularity: training interaction counts.
- ItemKNN (Deshpande & Karypis 2004): cosine similarity on the binary train matrix, each item's top-k neighbours.
- EASE^R (Steck 2019): closed-form linear item-item model, B = I - P·diagMat(1/diag(P)), P = (XᵀX + λI)⁻¹.
Hyper-parameters are chosen on the validation split; at test time the validation item is folded into the
user's input row without refitting.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch

from recsys.data.split import Split
from recsys.retrieval.evaluate import EvalResult, evaluate

KNN_KS = (50, 100, 200, None)  # None = all neighbours
EASE_LAMBDAS = (1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
SELECT_BY = "ndcg@10"


def popularity_scores(split: Split) -> np.ndarray:
    """[n_items] training interaction counts."""
    counts = np.zeros(split.n_items)
    for seq in split.train:
        np.add.at(counts, seq, 1)
    return counts


def itemknn_weights(x: sp.csr_matrix, k: int | None) -> np.ndarray:
    """[n_items, n_items] cosine similarities, each row (history item) keeping its top-k neighbours."""
    x = x.astype(np.float64).tocsc()
    co = (x.T @ x).toarray()  # [N, N] co-occurrence counts
    norms = np.sqrt(np.diag(co))
    sim = co / np.maximum(np.outer(norms, norms), 1e-12)
    np.fill_diagonal(sim, 0.0)
    if k is not None and k < sim.shape[1]:
        drop = np.argpartition(-sim, k, axis=1)[:, k:]
        np.put_along_axis(sim, drop, 0.0, axis=1)
    return sim


def ease_weights(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """[n_items, n_items] EASE^R weights (zero diagonal), solved in float64 with a Cholesky factorisation."""
    g = (x.T @ x).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = scipy.linalg.cho_solve(scipy.linalg.cho_factor(g), np.eye(g.shape[0]))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def matrix_scorer(split: Split, stage: str, weights: np.ndarray):
    """Scores = (user input row) · W, with the input row of `stage` (fold-in at test)."""
    x = split.matrix(stage)
    w = torch.from_numpy(weights)
    return lambda users: torch.from_numpy(np.asarray(x[users].todense())) @ w


def _tuned(split: Split, grid, make_weights, name: str, progress: bool) -> tuple[EvalResult, dict]:
    """Pick the grid value with the best validation NDCG@10, then evaluate it on test."""
    x_train = split.matrix("val")
    best = None
    for value in grid:
        w = make_weights(x_train, value)
        val = evaluate(matrix_scorer(split, "val", w), split, "val", progress=progress, desc=f"{name} {value}")
        if best is None or val.metrics[SELECT_BY] > best[1].metrics[SELECT_BY]:
            best = (value, val, w)
    value, val, w = best
    test = evaluate(matrix_scorer(split, "test", w), split, "test", progress=progress, desc=name)
    return test, {"value": value, "val": val.metrics}


def run_popularity(split: Split, progress: bool = True) -> tuple[EvalResult, dict]:
    pop = torch.from_numpy(popularity_scores(split))
    test = evaluate(lambda users: pop.expand(len(users), -1), split, "test", progress=progress, desc="popularity")
    return test, {}


def run_itemknn(split: Split, grid=KNN_KS, progress: bool = True) -> tuple[EvalResult, dict]:
    test, info = _tuned(split, grid, itemknn_weights, "itemknn", progress)
    return test, {"k": info["value"] if info["value"] is not None else "all", "val": info["val"]}


def run_ease(split: Split, grid=EASE_LAMBDAS, progress: bool = True) -> tuple[EvalResult, dict]:
    test, info = _tuned(split, grid, ease_weights, "ease", progress)
    return test, {"lambda": info["value"], "val": info["val"]}


