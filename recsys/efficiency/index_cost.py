"""What one search of a retrieval index costs: multiply-adds and bytes read per query (counted from the index's
settings and the catalog size), and a latency model per index kind calibrated on this machine.

Per query of dimension d over N items (k results):

    exact, flat     N·d                                   (every item scored)
    sq8, fp16       N·d on 1- / 2-byte codes
    ivf             nlist·d + nprobe·(N/nlist)·d           (coarse centroids, then the probed lists)
    ivfpq           nlist·d + nprobe·(2^nbits·d + (N/nlist)·m) + refine·k·d
                    (centroids; per probed list a look-up table and one add per sub-quantizer per item; re-rank)
    hnsw            efSearch·2M·d + log2(N)·M·d            (the base layer's candidate list × its degree 2M; the
                                                            greedy descent through the upper layers)

An index's cost is quoted with what it buys: `search_cost` puts its work and memory beside its recall@10 against
exact search on the model's own user queries (validation users; measured by `recsys.recipes.retrieval_index`),
since a setting that is cheap for item-like queries can miss most neighbours of real users.

Latency ≈ scale[kind] · work / 1e6 + overhead[kind] ms, the two constants fitted per kind on indexes measured
on this device (`recsys.serving.index_route.calibrate_index_latency`), cached under the device key like the
operator tables (`recsys.efficiency.predictor`). The counts follow Jégou et al. 2011 (IVFADC) and Malkov &
Yashunin 2018 (HNSW search complexity).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsys.config import RetrievalConfig, index_spec

CACHE_DIR = Path(os.environ.get("RECSYS_CACHE", Path.home() / ".cache" / "recsys")) / "latency"  # as the predictor's
CODE_BYTES = {"exact": 4, "flat": 4, "ivf": 4, "sq8": 1, "fp16": 2, "hnsw": 4}


def index_work(cfg: RetrievalConfig, n_items: int, dim: int) -> dict[str, float]:
    """Multiply-adds (`madds`), FLOPs (2 per multiply-add) and bytes of vectors/codes read by one query."""
    kind, n, d = cfg.index, n_items, dim
    if kind in ("exact", "flat", "sq8", "fp16"):
        madds, read = n * d, n * d * CODE_BYTES[kind]
    elif kind == "ivf":
        nlist = min(cfg.nlist, n)
        scanned = min(cfg.nprobe, nlist) * n / nlist
        madds, read = nlist * d + scanned * d, (nlist + scanned) * d * 4
    elif kind == "ivfpq":
        nlist = min(cfg.nlist, n)
        probes = min(cfg.nprobe, nlist)
        scanned = probes * n / nlist
        refined = cfg.refine * cfg.k
        madds = nlist * d + probes * 2 ** cfg.pq_nbits * d + scanned * cfg.pq_m + refined * d
        read = nlist * d * 4 + scanned * cfg.pq_m * cfg.pq_nbits / 8 + refined * d * 4
    elif kind == "hnsw":
        visited = cfg.ef_search * 2 * cfg.hnsw_m + math.log2(max(n, 2)) * cfg.hnsw_m
        madds, read = min(visited, n) * d, min(visited, n) * d * 4
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    return {"madds": float(madds), "flops": 2.0 * madds, "bytes_read": float(read)}


def index_memory_bytes(cfg: RetrievalConfig, n_items: int, dim: int) -> float:
    """Bytes an index holds (codes or vectors, ids, centroids, graph links); measured: ItemIndex.memory_bytes."""
    n, d = n_items, dim
    if cfg.index in ("exact", "flat", "sq8", "fp16"):
        return float(n * d * CODE_BYTES[cfg.index])
    if cfg.index == "ivf":
        return float(n * (d * 4 + 8) + cfg.nlist * d * 4)
    if cfg.index == "ivfpq":
        return float(n * (cfg.pq_m * cfg.pq_nbits / 8 + 8) + cfg.nlist * d * 4 + 2 ** cfg.pq_nbits * d * 4
                     + (n * d * 4 if cfg.refine else 0))
    return float(n * d * 4 + n * 2 * cfg.hnsw_m * 4 * 1.1)  # hnsw: vectors + base-layer links (+ upper layers)


def search_cost(cfg: RetrievalConfig, n_items: int, dim: int, recall: float, queries: str,
                tuning: dict | None = None) -> dict:
    """The index term of an online request: its spec, per-query work (`index_work`), bytes held, and the recall@10
    against exact it was measured at on `queries` (e.g. "validation users"), with how it was tuned if it was."""
    return {"spec": index_spec(cfg), **index_work(cfg, n_items, dim),
            "memory_bytes": index_memory_bytes(cfg, n_items, dim), "recall@10": float(recall),
            "recall_queries": queries, "tuning": tuning}


@dataclass
class IndexLatencyModel:
    """Per index kind: milliseconds per million multiply-adds (`scale`) and a fixed cost (`overhead_ms`)."""

    key: dict
    scale: dict[str, float] = field(default_factory=dict)
    overhead_ms: dict[str, float] = field(default_factory=dict)
    points: dict[str, list[list[float]]] = field(default_factory=dict)  # kind -> [[madds, measured ms], ...]

    def predict(self, cfg: RetrievalConfig, n_items: int, dim: int) -> float:
        """Predicted ms of one query (batch 1) through the index `cfg` describes."""
        if cfg.index not in self.scale:
            raise KeyError(f"index kind {cfg.index!r} is not calibrated on this device")
        return self.scale[cfg.index] * index_work(cfg, n_items, dim)["madds"] / 1e6 + self.overhead_ms[cfg.index]


def fit(model: IndexLatencyModel, kind: str, madds: list[float], ms: list[float]) -> None:
    """Least-squares scale and overhead (both >= 0) of one kind from measured (work, ms) points, relative error
    weighted (rows / ms) like the tower predictor."""
    from scipy.optimize import lsq_linear

    x, m = np.asarray(madds, dtype=np.float64) / 1e6, np.asarray(ms, dtype=np.float64)
    a = np.stack([x, np.ones_like(x)], axis=1) / m[:, None]
    scale, overhead = lsq_linear(a, np.ones_like(m), bounds=([0.0, 0.0], [np.inf, np.inf])).x
    model.scale[kind], model.overhead_ms[kind] = float(scale), float(overhead)
    model.points[kind] = [[float(w), float(t)] for w, t in zip(madds, ms, strict=True)]


def model_path(key: dict, cache_dir: Path = CACHE_DIR) -> Path:
    blob = json.dumps(key, sort_keys=True)
    return cache_dir / f"index-{hashlib.sha1(blob.encode()).hexdigest()[:16]}.json"


def load_model(key: dict, cache_dir: Path = CACHE_DIR) -> IndexLatencyModel | None:
    try:
        data = json.loads(model_path(key, cache_dir).read_text())
        return IndexLatencyModel(**data) if data.get("key") == key else None
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def save_model(model: IndexLatencyModel, cache_dir: Path = CACHE_DIR) -> Path:
    path = model_path(model.key, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(vars(model), indent=1))
    tmp.replace(path)
    return path
