"""Non-neural baselines on the same split, masking and ranking code as the two-tower model.

- Popularity: training interaction counts.
- ItemKNN (Deshpande & Karypis 2004): cosine similarity on the binary train matrix, each item's top-k neighbours,
  kept sparse (computed in row blocks, N·k non-zeros) and scored sparse × sparse, so it scales to large catalogs.
- EASE^R (Steck 2019): closed-form linear item-item model, B = I - P·diagMat(1/diag(P)), P = (XᵀX + λI)⁻¹: a
  dense N×N float64 Gram matrix and its inverse (O(N²) memory, O(N³) time); refused beyond `max_items`.
Hyper-parameters are chosen on the validation split; at test time the validation item is folded into the
user's input row without refitting.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from recsys.config import BaselinesConfig
from recsys.data.split import Split
from recsys.errors import RecsysError
from recsys.retrieval.evaluate import EvalResult, evaluate

# the default grids are the config's (baselines.itemknn_k, baselines.ease_lambdas: settable per run)
KNN_KS = tuple(k or None for k in BaselinesConfig().itemknn_k)  # None = all neighbours
EASE_LAMBDAS = tuple(BaselinesConfig().ease_lambdas)
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


def itemknn_sparse(x: sp.csr_matrix, k: int | None, block: int = 2048) -> sp.csr_matrix:
    """[n_items, n_items] sparse cosine similarities, each row keeping its top-k neighbours (all with k=None): the
    same weights as `itemknn_weights` (ties at the k-th value broken by ascending item index), computed in blocks of
    `block` rows so memory stays O(block·N + N·k)."""
    x = x.astype(np.float64).tocsc()
    n = x.shape[1]
    xt = x.T.tocsr()  # [N, U]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(0)).ravel())  # [N]
    inv = 1.0 / np.maximum(norms, 1e-12)
    rows, cols, vals = [], [], []
    for s in range(0, n, block):
        co = (xt[s:s + block] @ x).toarray()  # [b, N] co-occurrence counts
        sim = co * inv[s:s + block, None] * inv[None, :]
        sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = 0.0
        if k is not None and k < n:
            # top-k by (value desc, index asc): a stable sort keeps ascending indices among ties (values rounded to
            # 12 decimals, so cosines equal but for rounding tie however they were computed)
            top = np.argsort(-np.round(sim, 12), axis=1, kind="stable")[:, :k]  # [b, k]
        else:
            top = np.broadcast_to(np.arange(n), sim.shape)
        v = np.take_along_axis(sim, top, axis=1)
        keep = v != 0
        rows.append(np.broadcast_to(np.arange(s, s + len(sim))[:, None], top.shape)[keep])
        cols.append(top[keep])
        vals.append(v[keep])
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


EASE_MAX_ITEMS = 20_000  # default refusal limit: 20k items = 3.2 GB per N×N float64 matrix (≈ 3 of them live)


def ease_footprint(n_items: int) -> dict[str, float]:
    """What EASE^R's fit costs at `n_items`: bytes of one N×N float64 matrix (the fit holds ≈ 3: Gram, factor,
    inverse) and the FLOPs of the Cholesky factorisation and the solve for the inverse (≈ N³/3 + 2N³)."""
    return {"matrix_gb": n_items ** 2 * 8 / 1e9, "peak_gb": 3 * n_items ** 2 * 8 / 1e9,
            "flops": n_items ** 3 / 3 + 2 * n_items ** 3}


def check_ease(n_items: int, max_items: int = EASE_MAX_ITEMS) -> str:
    """One line stating EASE^R's cost at this catalog size; a RecsysError beyond `max_items`."""
    f = ease_footprint(n_items)
    line = (f"EASE^R on {n_items:,} items: dense {n_items:,}×{n_items:,} float64 matrices ({f['matrix_gb']:.2f} GB "
            f"each, ≈ {f['peak_gb']:.1f} GB peak) and O(N³) ≈ {f['flops'] / 1e12:.2f} TFLOP per λ")
    if n_items > max_items:
        raise RecsysError(f"{line}: beyond baselines.ease_max_items={max_items:,}; use ItemKNN (sparse top-k "
                          f"neighbours) or a smaller catalog (or raise baselines.ease_max_items)")
    return line


def ease_weights(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """[n_items, n_items] EASE^R weights (zero diagonal), solved in float64 with a Cholesky factorisation.
    torch's LAPACK, not scipy's: scipy's bundled OpenBLAS segfaulted in its Cholesky on a 17,000-item Gram matrix
    (AVX-512 EPYC; experiments/baselines_scale.py), torch factorises and inverts it in 78 s."""
    g = torch.from_numpy((x.T @ x).toarray().astype(np.float64))  # [N, N]
    g.diagonal().add_(lam)
    p = torch.cholesky_inverse(torch.linalg.cholesky(g))  # (XᵀX + λI)⁻¹
    del g
    b = -p / p.diagonal()[None, :]
    b.fill_diagonal_(0.0)
    # C order: LAPACK's inverse comes back column-major, and scipy's sparse × dense product copies a non-C-contiguous
    # dense operand on every call (2.3 GB per batch of users at 17k items)
    return np.ascontiguousarray(b.numpy())


def matrix_scorer(split: Split, stage: str, weights: np.ndarray):
    """Scores = (user input row) · W (dense array or sparse matrix), with the input row of `stage` (fold-in at
    test)."""
    x = split.matrix(stage)
    if sp.issparse(weights):  # sparse × sparse: [B, N] rows of the user inputs times the sparse neighbours
        w = weights.tocsr()
        return lambda users: torch.from_numpy((x[users] @ w).toarray())
    # sparse history rows × dense W: nnz·N multiply-adds instead of B·N² (EASE^R at 17k items over 50k users: 1.5e10
    # instead of 1.4e13 per stage)
    return lambda users: torch.from_numpy(np.asarray(x[users] @ weights))


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
    test, info = _tuned(split, grid, itemknn_sparse, "itemknn", progress)
    return test, {"k": info["value"] if info["value"] is not None else "all", "val": info["val"]}


def run_ease(split: Split, grid=EASE_LAMBDAS, progress: bool = True,
             max_items: int = EASE_MAX_ITEMS) -> tuple[EvalResult, dict]:
    line = check_ease(split.n_items, max_items)  # before fitting: refused beyond max_items
    if progress:
        print(f"{line}, {len(grid)} values of λ", flush=True)
    test, info = _tuned(split, grid, ease_weights, "ease", progress)
    return test, {"lambda": info["value"], "val": info["val"]}


