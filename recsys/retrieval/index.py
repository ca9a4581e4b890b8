"""Retrieval indexes over a catalog's item embeddings: exact search, or a faiss index built from a
`RetrievalConfig` (`retrieval.*` in a run config, or a spec string such as "hnsw,M=32,efSearch=64").

| index   | faiss                                   | what a query costs                                  |
|---------|-----------------------------------------|-----------------------------------------------------|
| exact   | none: torch `q @ items.T` + top-k       | N·d multiply-adds                                   |
| flat    | IndexFlatIP                             | N·d (faiss's BLAS / SIMD kernels)                    |
| sq8/fp16| IndexScalarQuantizer (8-bit / fp16 codes)| N·d on 1- / 2-byte codes                            |
| ivf     | IndexIVFFlat (k-means coarse quantizer) | nlist·d + nprobe·(N/nlist)·d                        |
| ivfpq   | IndexIVFPQ (+ IndexRefineFlat)          | nlist·d + nprobe·(N/nlist)·m look-ups (+ refine·k·d) |
| hnsw    | IndexHNSWFlat                           | ≈ efSearch·M distance computations, log-depth graph  |

References: Jégou, Douze & Schmid 2011 (product quantization, IVFADC); Malkov & Yashunin 2018 (HNSW); Johnson,
Douze & Jégou 2019 (billion-scale search on GPUs, faiss); Douze et al. 2024 (the faiss library).

Embeddings are L2-normalised, so inner product = cosine and every index is built with METRIC_INNER_PRODUCT.
One code path for CPU and GPU: the index is built on the CPU and, with `device=gpu`, copied to faiss's GPU
index of the same kind (`faiss.index_cpu_to_gpu`; HNSW has none). A built index is saved with the fingerprint of
what it was built from (a run's checkpoint and item texts): `load_index` refuses one whose source has changed.
A cached index that is truncated, corrupt, or not over this catalog (its metadata, its vectors' count or dimension)
is rebuilt, saying so in one line; queries of another dimension than the index are one line.
Two settings concern the queries that arrive (user vectors, which are not distributed like items): `probe=queries`
(IVF-Flat) fits the lists' probe vectors to sampled user queries (`recsys.retrieval.query_aware`), and
`recall=<target>` has nprobe / efSearch tuned to that recall@10 on validation users (`recsys.retrieval.index_tuning`,
called by `recsys.recipes.retrieval_index`).
faiss is an optional dependency (`pip install recsys[faiss]`), imported when an index is built.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from recsys.config import RetrievalConfig, index_spec
from recsys.errors import RecsysError

MIN_POINTS_PER_LIST = 39  # faiss's k-means warns below 39 training points per centroid
TRAIN_PER_LIST = 64  # default k-means / PQ training sample: this many items per centroid (faiss caps at 256)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise RecsysError("faiss is not installed: pip install 'recsys[faiss]' (faiss-cpu), or faiss's GPU build"
                          ) from None
    return faiss


def gpu_available() -> bool:
    """faiss can place indexes on a CUDA device (its GPU build and at least one visible GPU)."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def check_index(cfg: RetrievalConfig, n_items: int, dim: int) -> None:
    """What can only be checked against the catalog: one RecsysError line per problem."""
    spec = index_spec(cfg)
    if cfg.index in ("ivf", "ivfpq") and cfg.nlist > n_items:
        raise RecsysError(f"retrieval.nlist: {cfg.nlist} lists for a catalog of {n_items} items ({spec}); nlist "
                          f"must be <= the catalog size, ideally <= {max(1, n_items // MIN_POINTS_PER_LIST)} "
                          f"({MIN_POINTS_PER_LIST} items per list) — about 4·sqrt(N) = {int(4 * n_items ** 0.5)}")
    if cfg.index == "ivfpq":
        if dim % cfg.pq_m:
            divisors = [m for m in (8, 12, 16, 24, 32, 48, 64, 96) if dim % m == 0]
            raise RecsysError(f"retrieval.pq_m: {cfg.pq_m} sub-quantizers do not divide the embedding dim {dim} "
                              f"({spec}); choose a divisor, e.g. {', '.join(map(str, divisors)) or 1}")
        if 2 ** cfg.pq_nbits > n_items:
            raise RecsysError(f"retrieval.pq_nbits: {cfg.pq_nbits} bits = {2 ** cfg.pq_nbits} centroids per "
                              f"sub-quantizer, more than the {n_items} items to train them on ({spec})")
    if cfg.device == "gpu" and cfg.index != "exact":
        if cfg.index == "hnsw":
            raise RecsysError(f"retrieval.device=gpu: faiss has no GPU HNSW ({spec}); use ivf/ivfpq/flat on the GPU")
        if not gpu_available():
            raise RecsysError(f"retrieval.device=gpu: faiss sees no GPU ({spec}; faiss-cpu build or no CUDA "
                              f"device); use retrieval.device=cpu")


@dataclass
class ItemIndex:
    """A searchable catalog: `search(queries [B, d], k)` → (scores [B, k], item ids [B, k]; -1 = none found)."""

    cfg: RetrievalConfig
    n_items: int
    dim: int
    build_s: float
    index: object | None = None  # the faiss index (None: exact search over `items`)
    items: torch.Tensor | None = None  # [N, d] float32 (exact search only)
    tuning: object | None = None  # how its query-time setting was tuned to `cfg.recall` (index_tuning.Tuning)

    @property
    def spec(self) -> str:
        return index_spec(self.cfg)

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` items by inner product for each query row: (scores [B, k] float32, ids [B, k] int64)."""
        q = queries.detach().float().cpu().numpy() if torch.is_tensor(queries) else np.asarray(queries, np.float32)
        q = np.ascontiguousarray(q, dtype=np.float32)  # [B, d]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RecsysError(f"index {self.spec}: queries of shape {tuple(q.shape)} for an index over {self.dim}-d "
                              f"items (built for another embedding dimension? rebuild it: --rebuild-index)")
        k = min(k, self.n_items)
        if self.index is None:
            scores, ids = torch.topk(torch.from_numpy(q) @ self.items.T, k, dim=1)  # [B, k]
            return scores.numpy(), ids.numpy()
        return self.index.search(q, k)

    def memory_bytes(self) -> int:
        """Bytes the index holds: its serialized size (codes, lists, graph, centroids); exact: N·d·4."""
        if self.index is None:
            return int(self.items.numel() * 4)
        faiss = _faiss()
        cpu = faiss.index_gpu_to_cpu(self.index) if self.cfg.device == "gpu" else self.index
        return int(faiss.serialize_index(cpu).size)


def _build_cpu(faiss, items: np.ndarray, cfg: RetrievalConfig, seed: int, train_size: int | None):
    n, d = items.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.index == "flat":
        index = faiss.IndexFlatIP(d)
    elif cfg.index in ("sq8", "fp16"):
        qtype = faiss.ScalarQuantizer.QT_8bit if cfg.index == "sq8" else faiss.ScalarQuantizer.QT_fp16
        index = faiss.IndexScalarQuantizer(d, qtype, ip)
    elif cfg.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, ip)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:  # ivf, ivfpq: a flat coarse quantizer trained by k-means
        coarse = faiss.IndexFlatIP(d)
        if cfg.index == "ivf":
            index = faiss.IndexIVFFlat(coarse, d, cfg.nlist, ip)
        else:
            index = faiss.IndexIVFPQ(coarse, d, cfg.nlist, cfg.pq_m, cfg.pq_nbits, ip)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 5  # small catalogs: no warning per k-means (check_index bounds nlist)
        if cfg.index == "ivfpq":
            index.pq.cp.min_points_per_centroid = 5
        index.nprobe = cfg.nprobe  # (faiss's Python wrapper keeps `coarse` alive with the index)
        if cfg.refine:
            index = faiss.IndexRefineFlat(index)
            index.k_factor = float(cfg.refine)
    if not index.is_trained:  # k-means (and PQ codebooks) on a random sample
        rng = np.random.default_rng(seed)
        size = train_size or max(TRAIN_PER_LIST * cfg.nlist, TRAIN_PER_LIST * 2 ** min(cfg.pq_nbits, 8))
        sample = items if n <= size else items[np.sort(rng.choice(n, size, replace=False))]
        index.train(sample)
    index.add(items)
    return index


def _matrix(x: np.ndarray | torch.Tensor) -> np.ndarray:
    x = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(items: np.ndarray | torch.Tensor, cfg: RetrievalConfig, seed: int = 0,
                train_size: int | None = None, queries: np.ndarray | torch.Tensor | None = None) -> ItemIndex:
    """The index `cfg` describes over `items` [N, d] (L2-normalised float32 rows; row i = item i). `train_size`:
    k-means / PQ training on a random sample of that many items (default: TRAIN_PER_LIST per centroid).
    `queries` [Q, d]: sampled user queries, for `probe=queries` (its lists' probe vectors are fitted to them)."""
    x = _matrix(items)  # [N, d]
    if x.ndim != 2 or not len(x):
        raise RecsysError(f"item embeddings must be a non-empty [items, dim] matrix, got shape {x.shape}")
    n, d = x.shape
    check_index(cfg, n, d)
    if cfg.probe == "queries" and (queries is None or not len(queries)):
        raise RecsysError(f"retrieval.probe=queries ({index_spec(cfg)}): fitting the lists' probe vectors needs "
                          f"sampled user queries (a run's validation users)")
    start = time.perf_counter()
    if cfg.index == "exact":
        return ItemIndex(cfg, n, d, time.perf_counter() - start, items=torch.from_numpy(x))
    faiss = _faiss()
    index = _build_cpu(faiss, x, cfg, seed, train_size)
    if cfg.probe == "queries":
        from recsys.retrieval.query_aware import fit_router
        q = _matrix(queries)
        if q.ndim != 2 or q.shape[1] != d:
            raise RecsysError(f"retrieval.probe=queries: user queries of shape {q.shape} for {d}-d items")
        fit_router(index, x, q)
    if cfg.device == "gpu":
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index.res_keep = res
    return ItemIndex(cfg, n, d, time.perf_counter() - start, index=index)


def set_search_params(index: ItemIndex, cfg: RetrievalConfig) -> ItemIndex:
    """The same built index searched with another nprobe / efSearch / refine (query-time settings only)."""
    if index.index is None:
        return ItemIndex(cfg, index.n_items, index.dim, index.build_s, items=index.items)
    faiss = _faiss()
    inner = index.index
    if cfg.index == "ivfpq" and cfg.refine:
        inner.k_factor = float(cfg.refine)
        inner = faiss.downcast_index(inner.base_index)
    if cfg.index in ("ivf", "ivfpq"):
        (inner if index.cfg.device == "gpu" else faiss.extract_index_ivf(inner)).nprobe = cfg.nprobe
    if cfg.index == "hnsw":
        inner.hnsw.efSearch = cfg.ef_search
    return ItemIndex(cfg, index.n_items, index.dim, index.build_s, index=index.index)


def exact_topk(queries: torch.Tensor, items: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Ground truth: ids [B, k] of the exact top-k by inner product (queries in chunks, items [N, d])."""
    out = [torch.topk(queries[s:s + chunk] @ items.T, min(k, len(items)), dim=1).indices  # [b, k]
           for s in range(0, len(queries), chunk)]
    return torch.cat(out)


def recall_at(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] ∩ exact[:, :k]| / k over queries: the index's recall@k against exact search."""
    f, e = np.asarray(found)[:, :k], np.asarray(exact)[:, :k]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(f, e, strict=True)]))


# --- saving and loading, with the fingerprint of the source ---------------------------------------------------


def save_index(index: ItemIndex, folder: Path, fingerprint: str) -> None:
    """`folder`/index.faiss + meta.json (spec, catalog size, build time, source fingerprint)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"config": asdict(index.cfg), "spec": index.spec, "n_items": index.n_items, "dim": index.dim,
            "build_s": index.build_s, "fingerprint": fingerprint}
    if index.index is not None:
        faiss = _faiss()
        cpu = faiss.index_gpu_to_cpu(index.index) if index.cfg.device == "gpu" else index.index
        faiss.write_index(cpu, str(folder / "index.faiss.partial"))
        (folder / "index.faiss.partial").replace(folder / "index.faiss")
    (folder / "meta.json.partial").write_text(json.dumps(meta, indent=1))
    (folder / "meta.json.partial").replace(folder / "meta.json")  # last: a folder with meta.json is complete


class StaleIndex(Exception):
    """A cached index that cannot be used as it is (truncated, corrupt, or not for this catalog): rebuild it."""


def load_index(folder: Path, cfg: RetrievalConfig, fingerprint: str, items: torch.Tensor | None = None
               ) -> ItemIndex | None:
    """The index saved in `folder` for `cfg`, or None if there is none. One built from another source than
    `fingerprint` (the run was retrained or its catalog changed since) is a RecsysError; one whose files are
    truncated or corrupt, or that does not match its metadata or `items` [N, d], raises StaleIndex (why, in one
    line: `cached_index` rebuilds it)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        saved = RetrievalConfig(**meta["config"])
        n, d, build_s, source = int(meta["n_items"]), int(meta["dim"]), float(meta["build_s"]), meta["fingerprint"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise StaleIndex(f"{meta_path}: corrupt metadata ({type(e).__name__})") from None
    if source != fingerprint:
        raise RecsysError(f"{folder}: cached index {meta.get('spec')} was built from {str(source)[:12]}, but the "
                          f"run is now {fingerprint[:12]} (retrained or its catalog changed); rebuild it "
                          f"(--rebuild-index) or delete the folder")
    if items is not None and tuple(items.shape) != (n, d):
        raise StaleIndex(f"{folder}: cached index is over {n} × {d} items, the catalog is "
                         f"{items.shape[0]} × {items.shape[1]}")
    if cfg.index == "exact":
        return ItemIndex(cfg, n, d, build_s, items=items)
    faiss = _faiss()
    path = folder / "index.faiss"
    if not path.is_file():
        raise StaleIndex(f"{path}: missing beside its metadata")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:  # faiss: "read_xb_vector", "Index type ... not recognized", short reads
        raise StaleIndex(f"{path}: truncated or corrupt ({path.stat().st_size:,} bytes)") from None
    if (index.d, index.ntotal) != (d, n):
        raise StaleIndex(f"{path}: holds {index.ntotal} × {index.d} vectors, its metadata says {n} × {d}")
    if cfg.device == "gpu":
        check_index(cfg, n, d)
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index.res_keep = res
    built = ItemIndex(saved, n, d, build_s, index=index)
    return set_search_params(built, cfg)


def build_key(cfg: RetrievalConfig) -> str:
    """What a built index depends on (not its query-time settings nprobe, efSearch, refine factor, k)."""
    keep = {"exact": (), "flat": (), "sq8": (), "fp16": (), "ivf": ("nlist",), "ivfpq": ("nlist", "pq_m", "pq_nbits"),
            "hnsw": ("hnsw_m", "ef_construction")}[cfg.index]
    parts = [cfg.index, *(f"{k}={getattr(cfg, k)}" for k in keep)]
    if cfg.index == "ivfpq" and cfg.refine:
        parts.append("refine")
    if cfg.probe != "centroids":
        parts.append(f"probe={cfg.probe}")
    return "-".join(parts)


def cached_index(cache: Path, items: torch.Tensor, cfg: RetrievalConfig, fingerprint: str,
                 rebuild: bool = False, seed: int = 0, queries: torch.Tensor | None = None) -> ItemIndex:
    """The index over `items` from `cache`/<build key>/, built and saved there when missing (or `rebuild`);
    `queries`: the user queries a `probe=queries` index is fitted to (part of `fingerprint`'s source)."""
    folder = cache / build_key(cfg)
    try:
        found = None if rebuild else load_index(folder, cfg, fingerprint, items)
    except StaleIndex as e:
        print(f"warning: {e}: rebuilding it", file=sys.stderr, flush=True)
        found = None
    if found is not None:
        return found
    index = build_index(items, cfg, seed=seed, queries=queries)
    save_index(index, folder, fingerprint)
    return index
