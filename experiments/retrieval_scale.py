"""Retrieval at catalog scale, measured on the queries that arrive (issues 18, 26): exact search against faiss
indexes over catalogs of 10k, 100k and 1M items in the embedding spaces of trained runs, recall@10 against exact on
each run's own user queries (item-like queries beside, labelled) → results/benchmarks/retrieval_scale.json
(figure: notebooks/retrieval_scale.ipynb).

    python experiments/retrieval_scale.py --data-dir ../shared/datasets    # ≈ 50 min alone on 2 cores, < 8 GB
    python experiments/retrieval_scale.py --runs RUN --sizes 5000,20000 --out /tmp/rs.json   # smoke test, ≈ 3 min

The default runs (train them first; both reproduce their committed test NDCG@10, 0.0770 and 0.0730):
    recsys train --config configs/sequence_causal.yaml data.name=ml-100k data.data_dir=DATA train.seed=0 \
        tracking.run_name=ml100k-sequence-seed0       # the SASRec-style sequence tower (families' MiniLM text row)
    recsys train --config configs/ml100k.yaml data.data_dir=DATA train.seed=0 \
        tracking.run_name=ml-100k-bench-seed0         # the dense text two-tower (experiments/ml100k_baselines.py)

Per trained run — a space: its item vectors (keys) and its user vectors (queries); printed as it goes, everything
cached under results/cache/retrieval_scale/, so a rerun resumes:

1. Real keys: the run's item tower (through a sequence tower's adaptor) over the distinct item texts of ML-1M
   (subset: 3,883 movies), the MIND sample (2,000 news) and ML-100K (1,682 movies); 500 of them, drawn at random,
   are held out as item queries, the rest start every catalog. Real user queries: the run's own users on its
   dataset, as its evaluation encodes them — validation users to choose (tuning, probe vectors), test users to
   report.
2. Generators (`Generator`): spherical k-means (64 clusters) on the real vectors; per cluster its mean, the top
   principal directions of its members' residuals (up to 16) with their spreads, and the variance left in the other
   directions; a sample draws a cluster by its share, then mean + Σ spread_i·z_i·direction_i + residual noise,
   L2-normalised. One is fitted to the real keys (generated items), one the same way to the real validation user
   vectors (generated users). Check (`generator_check`), on the real catalog at its own size: recall@10 curves of
   IVF (nprobe grid) and HNSW (efSearch grid) for the real test users on the real catalog and on a generated one
   (the item generator), and for real test users against generated ones on the real catalog (the user generator).
3. Per catalog size N (real keys + generated ones): exact search (torch `q @ items.T` + top-k) and each index:
   `recall@10` against exact on 1,000 test user queries (the real test users, up to 500, and generated ones),
   `recall@10_item_queries` on 1,000 item queries (the 500 held-out real keys and 500 generated items: what issue 18
   measured), QPS on the user queries at batch 1 and batch 64 (each index interleaved with exact search, 2 threads,
   faiss's OpenBLAS kernels set by OPENBLAS_CORETYPE and recorded), build time and bytes. Query-time settings share
   one build. Beside the grids: IVF and HNSW tuned to `--target` recall@10 on validation user queries (half the
   real validation users + 500 generated; `recsys.retrieval.index_tuning`: the smallest nprobe / efSearch), and IVF
   whose probe vectors are fitted to other validation user queries (the other half + generated ones, 5,000 in all;
   `probe=queries`, `recsys.retrieval.query_aware`) over the nprobe grid and tuned the same way — the query-aware
   index against plain IVF and HNSW at equal recall (`at_equal_recall`).
4. NDCG@10 of each run's real dataset (test) exactly and through each index kind, nlist scaled to its catalog,
   tuned ones included (`recsys.recipes.retrieval_index.evaluate_run_index`).
5. The peak resident memory of the process.

The bar (issue 26): at 1M items, in every space, an index with recall@10 >= 0.95 on user queries at >= 20x exact's
QPS (batch 1); aim 50x. The first run given is the headline space (top-level `catalogs`, `bar`, `generator_check`);
every space is under `spaces`.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from recsys.serving.index_route import set_blas_coretype  # noqa: E402

CORETYPE = set_blas_coretype()  # before faiss (and its OpenBLAS) is loaded

import argparse  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import exit_with, write_benchmark  # noqa: E402

from recsys.config import index_spec, parse_index_spec  # noqa: E402
from recsys.efficiency.latency import exclusive, interleaved, threads  # noqa: E402
from recsys.errors import RecsysError  # noqa: E402
from recsys.retrieval.index import (  # noqa: E402
    ItemIndex,
    StaleIndex,
    build_key,
    exact_topk,
    load_index,
    recall_at,
    save_index,
    set_search_params,
)
from recsys.retrieval.index import build_index as _build  # noqa: E402
from recsys.retrieval.index_tuning import tune_index  # noqa: E402
from recsys.retrieval.query_aware import fit_router  # noqa: E402
from recsys.serving.index_route import blas_info, search_calls, set_faiss_threads  # noqa: E402

CACHE = Path("results/cache/retrieval_scale")
REAL_SOURCES = (("ml-1m", "ml-1m-subset"), ("mind", "mind-sample"), ("ml-100k", "ml-100k"))
N_QUERIES = 1000  # test user queries (and item queries) per catalog
N_ITEM_HELD_OUT = 500
N_VAL_GENERATED = 500  # generated validation users beside the real ones (tuning)
N_ROUTER = 5000  # validation user queries the probe vectors are fitted to (real + generated)
DEFAULT_RUNS = "results/runs/ml100k-sequence-seed0,results/runs/ml-100k-bench-seed0"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- 1. real item texts, a run's keys and user queries --------------------------------------------------------------


def real_texts(data_dir: Path) -> list[str]:
    """The item texts of the real datasets under `data_dir` (REAL_SOURCES, those present)."""
    from recsys.data.registry import load_dataset
    texts = []
    for name, folder in REAL_SOURCES:
        if (data_dir / folder).is_dir():
            ds = load_dataset(name, path=data_dir / folder)
            log(f"real items: {name}: {len(ds.item_texts)} texts")
            texts += list(ds.item_texts)
    if not texts:
        raise RecsysError(f"no real datasets under {data_dir} (expected {', '.join(f for _, f in REAL_SOURCES)})")
    unique = list(dict.fromkeys(texts))  # a movie in both MovieLens sets is one item: no tied duplicate vectors
    log(f"real items: {len(unique):,} distinct texts of {len(texts):,}")
    return unique


def real_embeddings(data_dir: Path, max_tokens: int = 32) -> np.ndarray:
    """[R, 384] zero-shot MiniLM embeddings of the real datasets' item texts (cached): issue 18's catalog space."""
    path = CACHE / "real_items.npy"
    if path.is_file():
        return np.load(path)
    from recsys.config import ModelConfig
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    from recsys.models.tower import encode_texts
    from recsys.models.two_tower import build_tower
    texts = real_texts(data_dir)
    tower = build_tower("minilm", ModelConfig(encoder="minilm"))
    tok = load_tokenizer(resolve_model_path("minilm"))
    log(f"encoding {len(texts)} item texts with MiniLM ({max_tokens} tokens)")
    emb = encode_texts(tower, tok, texts, max_tokens, 128, progress=False).numpy().astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


@dataclass
class Space:
    """A trained run's embedding space: its keys over the real item texts, its real user queries."""

    run: Path
    kind: str  # "text" | "sequence" (its user tower)
    keys: np.ndarray  # [R, d] real item texts through the run's item tower (and adaptor)
    val_users: np.ndarray  # [U, d] the run's validation user vectors
    test_users: np.ndarray  # [U, d] its test user vectors
    fingerprint: str

    @property
    def name(self) -> str:
        return self.run.name


def run_space(run: Path, texts: list[str]) -> Space:
    """The space of `run` (cached under CACHE/space-<run name>/ by the run's fingerprint)."""
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    from recsys.models.tower import encode_texts
    from recsys.recipes.retrieval_index import item_keys, open_search
    if not (run / "metrics.json").is_file():
        raise RecsysError(f"{run}: no trained run there (metrics.json); see this script's docstring for how to "
                          f"train it, or pass --runs")
    r = open_search(run, "exact", progress=False)
    kind = "sequence" if r.module.sequence else "text"
    h = hashlib.sha1(f"{r.fingerprint}\n{len(texts)}\n".encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    fp = h.hexdigest()
    folder = CACHE / f"space-{run.name}"
    path = folder / f"{fp[:16]}.npz"
    if path.is_file():
        z = np.load(path)
        return Space(run, kind, z["keys"], z["val"], z["test"], fp)
    log(f"{run.name} ({kind}): encoding {len(texts)} real item texts with its item tower")
    tok = load_tokenizer(resolve_model_path(r.cfg.model.encoder))
    items = encode_texts(r.module.item_tower, tok, texts, r.cfg.data.item_max_tokens, r.cfg.train.eval_batch_size,
                         progress=False)
    keys = item_keys(r.module, items).float().numpy()
    val, test = (r.queries(s).float().numpy() for s in ("val", "test"))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".partial.npz"), keys=keys, val=val, test=test)
    path.with_suffix(".partial.npz").replace(path)
    return Space(run, kind, keys, val, test, fp)


def similarity_gap(keys: np.ndarray, users: np.ndarray, n: int = 500) -> dict:
    """Median best cosine of a user to any item, and of an item to its nearest other item (the query gap), over
    the first `n` users and items (exact top-2 in chunks: no [n, N] matrix at 1M items)."""
    k, u = torch.from_numpy(keys), torch.from_numpy(users[:n])
    best_user = exact_topk(u, k, 1, chunk=64)[:, 0]  # [n]
    nearest = exact_topk(k[:n], k, 2, chunk=64)[:, 1]  # [n] (the first is the item itself)
    return {"user_to_item_median_best_cosine": float((u * k[best_user]).sum(1).median()),
            "item_to_item_median_best_cosine": float((k[:n] * k[nearest]).sum(1).median())}


# --- 2. the generators -------------------------------------------------------------------------------------------


class Generator:
    """A Gaussian mixture fitted to real embeddings: per k-means cluster its mean, top principal directions with
    their spreads and the remaining isotropic variance; samples are L2-normalised (see the module docstring)."""

    def __init__(self, real: np.ndarray, clusters: int = 64, rank: int = 16, seed: int = 0):
        import faiss
        d = real.shape[1]
        clusters = min(clusters, max(1, len(real) // 40))
        km = faiss.Kmeans(d, clusters, niter=25, seed=seed, spherical=True)
        km.train(real)
        _, assign = km.index.search(real, 1)
        self.weights, self.means, self.dirs, self.spreads, self.noise = [], [], [], [], []
        for j in range(clusters):
            x = real[assign[:, 0] == j]
            if len(x) < 2:
                continue
            mu = x.mean(0)
            r = x - mu
            _, s, vt = np.linalg.svd(r, full_matrices=False)
            k = min(rank, len(x) - 1)
            sd = s[:k] / math.sqrt(len(x) - 1)
            rest = max(0.0, (np.square(s).sum() - np.square(s[:k]).sum()) / (len(x) - 1) / max(1, d - k))
            self.weights.append(len(x))
            self.means.append(mu)
            self.dirs.append(vt[:k])
            self.spreads.append(sd)
            self.noise.append(math.sqrt(rest))
        self.weights = np.asarray(self.weights, dtype=np.float64) / np.sum(self.weights)
        self.dim = d

    def sample(self, n: int, seed: int, chunk: int = 100_000, out: np.ndarray | None = None) -> np.ndarray:
        """[n, dim] generated items (written into `out` when given: no second copy of a 1.5 GB catalog)."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32) if out is None else out
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            which = rng.choice(len(self.weights), m, p=self.weights)
            for j in np.unique(which):
                rows = np.flatnonzero(which == j)
                z = rng.standard_normal((len(rows), len(self.spreads[j])), dtype=np.float32)
                x = self.means[j] + (z * self.spreads[j]) @ self.dirs[j]
                x += self.noise[j] * rng.standard_normal((len(rows), self.dim), dtype=np.float32)
                out[s + rows] = x
            block = out[s:s + m]
            block /= np.linalg.norm(block, axis=1, keepdims=True)  # per chunk: no full-size temporary
        return out


def recall_curve(items: np.ndarray, queries: np.ndarray, seed: int = 0) -> dict:
    """recall@10 against exact of IVF over an nprobe grid and HNSW over an efSearch grid (the generator check)."""
    n = len(items)
    truth = exact_topk(torch.from_numpy(queries), torch.from_numpy(items), 10).numpy()
    nlist = max(8, min(int(4 * math.sqrt(n)), n // 39))
    out = {"n_items": n, "n_queries": len(queries), "nlist": nlist, "ivf": [], "hnsw": []}
    ivf = _build(items, parse_index_spec(f"ivf,nlist={nlist},nprobe=1,k=10"), seed=seed)
    for p in (1, 2, 4, 8, 16, 32):
        if p <= nlist:
            ix = set_search_params(ivf, parse_index_spec(f"ivf,nlist={nlist},nprobe={p},k=10"))
            out["ivf"].append({"nprobe": p, "recall@10": recall_at(ix.search(queries, 10)[1], truth, 10)})
    hnsw = _build(items, parse_index_spec("hnsw,M=16,efConstruction=40,efSearch=16,k=10"), seed=seed)
    for e in (16, 32, 64, 128, 256):
        ix = set_search_params(hnsw, parse_index_spec(f"hnsw,M=16,efConstruction=40,efSearch={e},k=10"))
        out["hnsw"].append({"ef_search": e, "recall@10": recall_at(ix.search(queries, 10)[1], truth, 10)})
    return out


def generator_check(items: np.ndarray, item_gen, users: np.ndarray, user_gen) -> dict:
    """On the real catalog's size: real test users on the real catalog (`real`) and on a generated one
    (`generated`: the item generator's check), and generated users on the real catalog (`generated_users`)."""
    out = {"real": recall_curve(items, users), "generated": recall_curve(item_gen.sample(len(items), seed=1), users),
           "generated_users": recall_curve(items, user_gen.sample(len(users), seed=2))}
    for kind in ("ivf", "hnsw"):
        log(f"  {kind} recall@10 on user queries, real / generated catalog / generated users: " + ", ".join(
            f"{a['recall@10']:.3f}/{b['recall@10']:.3f}/{c['recall@10']:.3f}" for a, b, c in
            zip(out["real"][kind], out["generated"][kind], out["generated_users"][kind], strict=True)))
    return out


# --- 3. catalogs, indexes and timings ---------------------------------------------------------------------------


def nlist_for(n: int) -> int:
    return max(8, min(int(4 * math.sqrt(n)), n // 39))


def index_grid(n: int, dim: int, hnsw_max: int) -> list[tuple[str, list[str]]]:
    """(build spec, [query-time specs sharing that build]) for a catalog of n items."""
    nlist = nlist_for(n)
    probes = [p for p in (4, 8, 16, 32, 64, 128) if p <= nlist]
    grid = [("flat,k=10", ["flat,k=10"]), ("sq8,k=10", ["sq8,k=10"]), ("fp16,k=10", ["fp16,k=10"]),
            (f"ivf,nlist={nlist},nprobe=1,k=10", [f"ivf,nlist={nlist},nprobe={p},k=10" for p in probes])]
    if dim % 48 == 0:
        grid.append((f"ivfpq,nlist={nlist},nprobe=1,m=48,nbits=8,refine=10,k=10",
                     [f"ivfpq,nlist={nlist},nprobe={p},m=48,nbits=8,refine=10,k=10" for p in probes if p >= 16]))
    if n <= hnsw_max:
        grid.append(("hnsw,M=16,efConstruction=40,efSearch=16,k=10",
                     [f"hnsw,M=16,efConstruction=40,efSearch={e},k=10" for e in (16, 32, 64, 128, 256, 512)]))
    return grid


def exact_calls(queries: torch.Tensor, items: torch.Tensor, batch: int):
    """Exact search (matmul + top-10) of successive `batch`-row slices of the queries, as the framework does."""
    state = {"i": 0}

    def call():
        s = state["i"] % max(1, len(queries) - batch + 1)
        state["i"] += batch
        return torch.topk(queries[s:s + batch] @ items.T, 10, dim=1).indices  # [batch, 10]
    return call


def qps(timing_ms: float, batch: int) -> float:
    return batch / (timing_ms / 1e3)


def cached_build(folder: Path, items: np.ndarray, spec: str, fingerprint: str) -> ItemIndex:
    """The index `spec` over items, cached in `folder` (a truncated or corrupt cache entry is rebuilt)."""
    cfg = parse_index_spec(spec)
    try:
        found = load_index(folder, cfg, fingerprint)
    except StaleIndex as e:
        log(f"  {e}: rebuilding it")
        found = None
    if found is not None:
        return found
    log(f"building {build_key(cfg)} over {len(items):,} items")
    index = _build(items, cfg, seed=0)
    save_index(index, folder, fingerprint)
    return index


def refit_router(index: ItemIndex, items: np.ndarray, queries: np.ndarray, spec: str) -> ItemIndex:
    """The plain IVF `index` turned query-aware in place: the same lists, probe vectors fitted to `queries` (no
    second k-means, no second copy of a 1.5 GB index; the plain one is measured before)."""
    t0 = time.perf_counter()
    info = fit_router(index.index, items, queries)
    fit_s = time.perf_counter() - t0
    log(f"  probe vectors fitted to {len(queries):,} validation user queries in {fit_s:.1f} s "
        f"(loss {info['loss_first']:.3f} -> {info['loss_last']:.3f})")
    return ItemIndex(parse_index_spec(spec), index.n_items, index.dim, index.build_s + fit_s, index=index.index)


def tuned_entry(index: ItemIndex, spec: str, val: torch.Tensor, keys: torch.Tensor, sets, exact_b1, exact_b64,
                rounds: int, big: bool, build_s: float, memory: float) -> dict:
    """The index tuned to `spec`'s recall target on validation user queries, measured on test ones; a target it
    cannot reach is recorded (with the best it found), not fatal."""
    try:
        tuned, tuning = tune_index(set_search_params(index, parse_index_spec(spec)), val, keys,
                                   what="validation user queries")
    except RecsysError as e:
        log(f"  {spec}: {e}")
        return {"spec": spec, "unreached": str(e), "queries": "validation user queries"}
    log(f"  tuned on {len(val):,} validation user queries: {tuning.param}={tuning.value} "
        f"(recall@10 {tuning.recall:.3f})")
    return measure(tuned, sets, exact_b1, exact_b64, rounds, big, build_s, memory, {"tuned": tuning.to_dict()})


def measure(ix: ItemIndex, sets: dict, exact_b1, exact_b64, rounds: int, big: bool, build_s: float,
            memory: float, extra: dict | None = None) -> dict:
    """One entry: recall@10 on test user queries and on item queries, QPS (user queries) against exact."""
    users, truth = sets["test"]
    items_q, items_truth = sets["items"]
    rec = recall_at(ix.search(users, 10)[1], truth, 10)
    rec_items = recall_at(ix.search(items_q, 10)[1], items_truth, 10)
    with exclusive():
        b1 = interleaved({"index": search_calls(ix, users, 1), "exact": exact_b1},
                         rounds=rounds, per_round=3 if big else 10, warmup=2)
        b64 = interleaved({"index": search_calls(ix, users, 64), "exact": exact_b64},
                          rounds=max(2, rounds // 2), per_round=1 if big else 3, warmup=1)
    entry = {"spec": index_spec(ix.cfg), "recall@10": rec, "recall@10_item_queries": rec_items,
             "queries": "test users", "qps_b1": qps(b1["index"].p50, 1), "qps_b64": qps(b64["index"].p50, 64),
             "build_s": build_s, "memory_mb": memory, "ms_b1_p50": b1["index"].p50, "ms_b1_p90": b1["index"].p90,
             "speedup_b1": b1["exact"].p50 / b1["index"].p50, "speedup_b64": b64["exact"].p50 / b64["index"].p50,
             **(extra or {})}
    log(f"  {entry['spec']}: recall@10 {rec:.3f} on user queries ({rec_items:.3f} item queries), "
        f"{entry['ms_b1_p50']:.3f} ms b1 ({entry['speedup_b1']:.1f}x exact), {entry['qps_b64']:.0f} QPS b64 "
        f"({entry['speedup_b64']:.1f}x)")
    return entry


def run_catalog(n: int, space: Space, real_items: np.ndarray, item_queries: np.ndarray, item_gen, user_gen,
                hnsw_max: int, rounds: int, target: float) -> dict:
    """One catalog size of one space: exact against every index of `index_grid`, the tuned and query-aware ones."""
    n_real = min(len(real_items), n)
    log(f"== {space.name}: catalog {n:,} items ({n_real:,} real + {n - n_real:,} generated)")
    d = real_items.shape[1]
    items = np.empty((n, d), dtype=np.float32)  # real keys first, generated in place after
    items[:n_real] = real_items[:n_real]
    if n > n_real:
        item_gen.sample(n - n_real, seed=n, out=items[n_real:])
    real_test = space.test_users[:N_QUERIES // 2]
    test = np.concatenate([real_test, user_gen.sample(N_QUERIES - len(real_test), seed=10 ** 9 + n)])
    # validation users, split in two disjoint halves: the probe vectors are fitted to one, tuning uses the other
    val = np.concatenate([space.val_users[1::2], user_gen.sample(N_VAL_GENERATED, seed=2 * 10 ** 9 + n)])
    fit = space.val_users[0::2]
    router = np.concatenate([fit, user_gen.sample(max(0, N_ROUTER - len(fit)), seed=3 * 10 ** 9 + n)])
    iq = np.concatenate([item_queries, item_gen.sample(N_QUERIES - len(item_queries), seed=4 * 10 ** 9 + n)])
    items_t = torch.from_numpy(items)
    sets = {name: (q, exact_topk(torch.from_numpy(q), items_t, 10, chunk=64).numpy())  # 64 × N scores at a time
            for name, q in (("test", test), ("items", iq))}
    test_t = torch.from_numpy(test)
    exact_b1, exact_b64 = exact_calls(test_t, items_t, 1), exact_calls(test_t, items_t, 64)
    big = n >= 500_000
    row = {"n_items": n, "n_real": n_real, "n_queries": len(test), "n_real_user_queries": len(real_test),
           "n_item_queries": len(iq), "n_val_queries": len(val), "n_router_queries": len(router), "indexes": [],
           "unreached": [], "gap": similarity_gap(items, test)}
    with exclusive():
        t = interleaved({"b1": exact_b1}, rounds=rounds, per_round=3 if big else 10, warmup=2)
        t64 = interleaved({"b64": exact_b64}, rounds=max(2, rounds // 2), per_round=1 if big else 3, warmup=1)
    row["exact"] = {"qps_b1": qps(t["b1"].p50, 1), "qps_b64": qps(t64["b64"].p50, 64), "ms_b1_p50": t["b1"].p50,
                    "ms_b64_p50": t64["b64"].p50, "memory_mb": items.nbytes / 2 ** 20}
    log(f"exact: {row['exact']['ms_b1_p50']:.2f} ms at batch 1 ({row['exact']['qps_b1']:.0f} QPS), "
        f"{row['exact']['qps_b64']:.0f} QPS at batch 64; median best cosine user→item "
        f"{row['gap']['user_to_item_median_best_cosine']:.3f}, item→item "
        f"{row['gap']['item_to_item_median_best_cosine']:.3f}")
    folder = CACHE / f"space-{space.name}" / f"n{n}"
    val_t = torch.from_numpy(val)
    for build_spec, specs in index_grid(n, d, hnsw_max):
        index = cached_build(folder / build_key(parse_index_spec(build_spec)), items, build_spec, space.fingerprint)
        build_s, memory = index.build_s, index.memory_bytes() / 2 ** 20
        log(f"  {build_key(index.cfg)}: built in {build_s:.1f} s, {memory:.0f} MiB")
        for spec in specs:
            row["indexes"].append(measure(set_search_params(index, parse_index_spec(spec)), sets, exact_b1,
                                          exact_b64, rounds, big, build_s, memory))
        kind = index.cfg.index
        if kind in ("ivf", "hnsw"):  # tuned to the target on validation user queries, reported on test ones
            e = tuned_entry(index, f"{build_spec},recall={target}", val_t, items_t, sets, exact_b1, exact_b64, rounds,
                            big, build_s, memory)
            row["unreached" if "unreached" in e else "indexes"].append(e)
        if kind == "ivf":  # the query-aware IVF: the same lists, probe vectors fitted to validation user queries
            aware = refit_router(index, items, router, f"{build_spec},probe=queries")
            for spec in specs:
                row["indexes"].append(measure(set_search_params(aware, parse_index_spec(f"{spec},probe=queries")),
                                              sets, exact_b1, exact_b64, rounds, big, aware.build_s, memory))
            e = tuned_entry(aware, f"{build_spec},probe=queries,recall={target}", val_t, items_t, sets, exact_b1,
                            exact_b64, rounds, big, aware.build_s, memory)
            row["unreached" if "unreached" in e else "indexes"].append(e)
            del aware
        del index  # the last searched view holds the faiss index too: free it before the next build
        gc.collect()
    row["at_equal_recall"] = equal_recall(row["indexes"] + row["unreached"], target)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def equal_recall(entries: list[dict], target: float) -> dict:
    """The tuned indexes side by side: each kind at the target recall, its measured test recall and speed-up."""
    out = {}
    for e in entries:
        if "tuned" in e or "unreached" in e:
            name = "ivf_probe_queries" if "probe=queries" in e["spec"] else e["spec"].split(",")[0]
            out[name] = ({"spec": e["spec"], "unreached": e["unreached"]} if "unreached" in e else
                         {"spec": e["spec"], "val_recall@10": e["tuned"]["recall"], "recall@10": e["recall@10"],
                          "speedup_b1": e["speedup_b1"], "ms_b1_p50": e["ms_b1_p50"]})
    return {"target": target, **out}


def bar(catalogs: list[dict]) -> dict:
    """The issue's bar at the largest catalog: the fastest index with recall@10 >= 0.95 on user queries."""
    big = max(catalogs, key=lambda c: c["n_items"])
    ok = [i for i in big["indexes"] if i["recall@10"] >= 0.95]
    best = max(ok, key=lambda i: i["speedup_b1"]) if ok else None
    return {"n_items": big["n_items"], "queries": "test users", "best": best,
            "met": bool(best and best["speedup_b1"] >= 20), "aim_met": bool(best and best["speedup_b1"] >= 50)}


# --- 4. NDCG@10 of a real dataset through each index --------------------------------------------------------------


def ndcg_through_indexes(run: Path, target: float) -> dict:
    from recsys.recipes.retrieval_index import evaluate_run_index
    n = json.loads((run / "metrics.json").read_text()).get("catalog_items", 1682)
    nlist = max(4, n // 39)
    specs = ["flat", "sq8", "fp16", f"ivf,nlist={nlist},nprobe={max(1, nlist // 8)}",
             f"ivf,nlist={nlist},nprobe={max(1, nlist // 2)}", f"ivf,nlist={nlist},recall={target}",
             f"ivf,nlist={nlist},nprobe={max(1, nlist // 8)},probe=queries",
             f"ivf,nlist={nlist},probe=queries,recall={target}",
             "hnsw,M=16,efConstruction=40,efSearch=100", f"hnsw,M=16,efConstruction=40,recall={target}"]
    rows, exact = [], None
    for spec in specs:
        log(f"NDCG@10 of {run.name} (test) through {spec}")
        res = evaluate_run_index(run, spec, "test", progress=False)
        exact = res.exact.metrics
        rows.append({"spec": res.spec, "ndcg@10": res.index.metrics["ndcg@10"],
                     "recall@10": res.index.metrics["recall@10"], "ann_recall@10_test_users": res.ann_recall,
                     **{f"{k}_vs_exact": v for k, v in res.recall_vs_exact.items()},
                     "ndcg_vs_exact": res.index.metrics["ndcg@10"] / max(exact["ndcg@10"], 1e-12),
                     **({"tuned": res.tuning} if res.tuning else {})})
        log(f"  {res.spec}: NDCG@10 {rows[-1]['ndcg@10']:.4f} ({rows[-1]['ndcg_vs_exact']:.1%} of exact), ann "
            f"recall@10 {res.ann_recall:.3f} on test users")
    return {"run": str(run), "n_items": n, "exact": {"ndcg@10": exact["ndcg@10"], "recall@10": exact["recall@10"]},
            "indexes": rows}


def run_one_space(space: Space, sizes: list[int], hnsw_max: int, rounds: int, target: float, ndcg: bool) -> dict:
    rng = np.random.default_rng(0)
    order = rng.permutation(len(space.keys))
    n_q = min(N_ITEM_HELD_OUT, len(space.keys) // 5)
    item_queries, real_items = space.keys[order[:n_q]], space.keys[order[n_q:]]
    log(f"{space.name} ({space.kind}): {len(real_items):,} real keys + {n_q} held-out item queries, "
        f"{len(space.val_users)} / {len(space.test_users)} validation / test users; fitting the generators")
    item_gen, user_gen = Generator(real_items), Generator(space.val_users)
    log(f"generators: {len(item_gen.weights)} item clusters, {len(user_gen.weights)} user clusters; check at "
        f"{len(real_items):,} items")
    check = generator_check(real_items, item_gen, space.test_users, user_gen)
    catalogs = []
    for n in sizes:
        catalogs.append(run_catalog(n, space, real_items, item_queries, item_gen, user_gen, hnsw_max, rounds,
                                    target))
        gc.collect()
    return {"run": str(space.run), "kind": space.kind, "dim": int(space.keys.shape[1]), "catalogs": catalogs,
            "bar": bar(catalogs), "generator_check": check, "gap_real": similarity_gap(real_items, space.test_users),
            "generator": {"item_clusters": len(item_gen.weights), "user_clusters": len(user_gen.weights), "rank": 16,
                          "real_items": len(real_items), "item_queries": n_q, "real_val_users": len(space.val_users),
                          "real_test_users": len(space.test_users), "sources": [f for _, f in REAL_SOURCES]},
            "ndcg": ndcg_through_indexes(space.run, target) if ndcg else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="trained runs whose spaces are measured (comma-separated; "
                    "the first is the headline)")
    ap.add_argument("--target", type=float, default=0.95, help="recall@10 the tuned indexes reach on validation "
                    "user queries")
    ap.add_argument("--no-ndcg", action="store_true", help="skip NDCG through the indexes on the real datasets")
    ap.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest catalog HNSW is built for")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds per index")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/benchmarks/retrieval_scale.json")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = [Path(r) for r in args.runs.split(",") if r]
    if not runs:
        raise RecsysError("--runs: at least one trained run (its item and user vectors are the space measured)")
    torch.set_num_threads(args.threads)
    set_faiss_threads(args.threads)
    blas = blas_info()
    log(f"threads {args.threads}; OPENBLAS_CORETYPE={CORETYPE}; BLAS: "
        + ", ".join(f"{b['internal_api']} {b['version']} {b['architecture']}" for b in blas["libraries"]))
    texts = real_texts(Path(args.data_dir))
    spaces = []
    with threads(args.threads):
        for run in runs:
            spaces.append(run_one_space(run_space(run, texts), sizes, args.hnsw_max, args.rounds, args.target,
                                        not args.no_ndcg))
            gc.collect()
    head = spaces[0]
    result = {"catalogs": head["catalogs"], "bar": head["bar"], "generator_check": head["generator_check"],
              "headline_space": head["run"], "spaces": spaces, "target": args.target,
              "bar_all_spaces": {"met": all(s["bar"]["met"] for s in spaces),
                                 "aim_met": all(s["bar"]["aim_met"] for s in spaces)},
              "queries": "recall@10 on test user queries (real test users + generated); recall@10_item_queries: "
                         "held-out real items + generated items (issue 18's queries)",
              "threads": args.threads, "blas": blas, "openblas_coretype": CORETYPE, "peak_rss_mb": peak_rss_mb()}
    write_benchmark(args.out, result)
    for s in spaces:
        b = s["bar"]
        log(f"{Path(s['run']).name}: bar at {b['n_items']:,} items on user queries: "
            + (f"{b['best']['spec']} recall@10 {b['best']['recall@10']:.3f} at {b['best']['speedup_b1']:.1f}x exact "
               f"({'met' if b['met'] else 'not met'})" if b["best"] else "no index reaches recall@10 0.95"))
    log(f"wrote {args.out}; peak RSS {result['peak_rss_mb']:.0f} MiB")
    return 0


if __name__ == "__main__":
    exit_with(main)
