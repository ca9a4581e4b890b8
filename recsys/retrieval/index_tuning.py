"""An index tuned to a recall target on user queries: the smallest query-time setting — nprobe (IVF, IVF-PQ) or
efSearch (HNSW) — whose recall@10 against exact search reaches `retrieval.recall` on the tuning queries (a run's
validation users: the queries that really arrive, never held-out items standing in for them).

Recall here is the index's own (ANN) recall: its top 10 for each query against exact search's top 10 over the
whole catalog, the definition `experiments/retrieval_scale.py` uses at every catalog size. The search doubles the
setting from its smallest value until the target is reached, then bisects between the last value that missed and
the first that reached it. Recall grows with nprobe for IVF-Flat (more lists, a superset of candidates) and all
but monotonically with efSearch, so the result is the smallest value (IVF-Flat) or one very close to it, and it
always reaches the target on the tuning queries. An IVF-Flat index reaches any target (nprobe = nlist is exact);
a target that IVF-PQ's codes or HNSW's graph cannot reach within the range is a RecsysError naming the best found.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from recsys.config import RetrievalConfig, index_spec
from recsys.errors import RecsysError
from recsys.retrieval.index import ItemIndex, exact_topk, recall_at, set_search_params

RECALL_K = 10  # the target is recall@10 against exact search
HNSW_MAX_EF = 16_384  # the largest efSearch tried


@dataclass
class Tuning:
    """What tuning chose: the setting, its recall on the tuning queries, and every point measured."""

    target: float
    param: str  # "nprobe" | "ef_search"
    value: int
    recall: float  # recall@10 against exact at `value` on the tuning queries
    spec: str  # the tuned index's spec
    n_queries: int
    queries: str  # what the tuning queries were, e.g. "validation users"
    curve: list[list[float]] = field(default_factory=list)  # [[value, recall@10], ...] in the order measured

    def to_dict(self) -> dict:
        return asdict(self)


def search_range(cfg: RetrievalConfig, n_items: int) -> tuple[str, int, int]:
    """(the query-time setting tuning moves, its smallest value, its largest) for the index kind of `cfg`."""
    if cfg.index in ("ivf", "ivfpq"):
        return "nprobe", 1, min(cfg.nlist, n_items)
    if cfg.index == "hnsw":
        return "ef_search", cfg.k, max(cfg.k, min(HNSW_MAX_EF, n_items))
    raise RecsysError(f"retrieval.recall: {index_spec(cfg)} has no query-time setting to tune (ivf, ivfpq, hnsw)")


def ann_recall(index: ItemIndex, queries: np.ndarray | torch.Tensor, truth: np.ndarray, k: int = RECALL_K) -> float:
    """recall@k of `index` against exact top-k ids `truth` [Q, k] for queries [Q, d]."""
    return recall_at(index.search(queries, k)[1], truth, k)


def tune_index(index: ItemIndex, queries: torch.Tensor, keys: torch.Tensor, target: float | None = None,
               what: str = "validation users") -> tuple[ItemIndex, Tuning]:
    """The built `index` (over keys [N, d]) searched with the smallest nprobe / efSearch whose recall@10 against
    exact reaches `target` (default: its `cfg.recall`) on queries [Q, d]; and what tuning measured."""
    cfg = index.cfg
    target = cfg.recall if target is None else target
    if not 0 < target <= 1:
        raise RecsysError(f"retrieval.recall: a target in (0, 1] is needed to tune {index.spec}, got {target}")
    if not len(queries):
        raise RecsysError(f"retrieval.recall={target}: no {what} to tune {index.spec} on")
    param, lo, hi = search_range(cfg, index.n_items)
    q = queries.float()
    truth = exact_topk(q, keys.float(), RECALL_K, chunk=64).numpy()  # [Q, 10]
    measured: dict[int, float] = {}
    curve: list[list[float]] = []

    def at(v: int) -> float:
        if v not in measured:
            measured[v] = ann_recall(set_search_params(index, replace(cfg, **{param: v})), q, truth)
            curve.append([v, measured[v]])
        return measured[v]

    miss, v = lo - 1, lo
    while at(v) < target:  # doubling: the first value that reaches the target
        if v >= hi:
            best = max(measured, key=measured.get)
            raise RecsysError(f"retrieval.recall={target}: {index_spec(cfg)} reaches at most recall@10 "
                              f"{measured[best]:.4f} on {len(q)} {what} ({param}={best}; tried up to {hi}); lower "
                              f"the target or build a finer index (nlist, M, efConstruction, pq_m)")
        miss, v = v, min(hi, 2 * v)
    while v - miss > 1:  # bisect (miss, v]: v reaches the target, miss does not
        mid = (miss + v) // 2
        miss, v = (miss, mid) if at(mid) >= target else (mid, v)
    tuned = set_search_params(index, replace(cfg, **{param: v}))
    return tuned, Tuning(target, param, v, measured[v], tuned.spec, len(q), what, curve)
