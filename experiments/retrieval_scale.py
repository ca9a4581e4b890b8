"""Retrieval at catalog scale (issue 18): exact search against faiss indexes over catalogs of 10k, 100k and 1M
items of 384-d embeddings → results/benchmarks/retrieval_scale.json (figure: notebooks/retrieval_scale.ipynb).

    python experiments/retrieval_scale.py --data-dir ../shared/datasets      # ≈ 25-35 min on 2 CPU cores, < 8 GB
    python experiments/retrieval_scale.py --sizes 2000,5000 --out /tmp/rs.json    # smoke test, ≈ 1 min

What it does, printed as it goes (everything cached under results/cache/retrieval_scale/, so a rerun resumes):

1. Real item-tower embeddings: the packaged all-MiniLM-L6-v2 (mean pooled, L2-normalised: the zero-shot item
   tower, 384-d) over the item texts of ML-1M (subset: 3,883 movies), the MIND sample (2,000 news) and ML-100K
   (1,682 movies). 500 of them, drawn at random, are held out as queries; the rest start every catalog.
2. The generator that extends them (`Generator`): spherical k-means (64 clusters) on the real items; per cluster
   its mean, the top principal directions of its members' residuals (up to 16) with their spreads, and the
   variance left in the other directions. A generated item draws a cluster by its share of real items, then
   mean + Σ spread_i·z_i·direction_i + residual noise, and is L2-normalised: the clusters' sizes, positions and
   within-cluster shapes are kept, no real item is copied. Check (`generator_check`): at the real catalog's own
   size, the recall@10 curves of IVF (nprobe grid) and HNSW (efSearch grid) for the same queries on the real
   catalog and on a generated one of that size.
3. Per catalog size N (real items + generated ones): exact search (torch `q @ items.T` + top-k, what the
   framework does today) and each index: recall@10 against exact on 1,000 queries (the 500 held-out real items
   and 500 generated), QPS at batch 1 and batch 64 (each index interleaved with exact search, 2 threads,
   faiss's OpenBLAS kernels set by OPENBLAS_CORETYPE and recorded), build time and the index's bytes.
   Query-time settings (nprobe, efSearch) share one build.
4. NDCG@10 of a real dataset through each index: a trained run (`--run`, default the ML-100K reference run when
   present) evaluated on test exactly and through each index kind, nlist scaled to its catalog
   (`recsys.recipes.retrieval_index.evaluate_run_index`).
5. The peak resident memory of the process.

The bar (issue 18): at 1M items an index with recall@10 >= 0.95 against exact at >= 20x exact's QPS (batch 1).
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
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import write_benchmark  # noqa: E402

from recsys.config import index_spec, parse_index_spec  # noqa: E402
from recsys.efficiency.latency import exclusive, interleaved, threads  # noqa: E402
from recsys.retrieval.index import build_index as _build  # noqa: E402
from recsys.retrieval.index import (  # noqa: E402
    build_key,
    exact_topk,
    load_index,
    recall_at,
    save_index,
    set_search_params,
)
from recsys.serving.index_route import blas_info, search_calls, set_faiss_threads  # noqa: E402

CACHE = Path("results/cache/retrieval_scale")
REAL_SOURCES = (("ml-1m", "ml-1m-subset"), ("mind", "mind-sample"), ("ml-100k", "ml-100k"))
N_QUERIES = 1000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- 1. real item-tower embeddings ------------------------------------------------------------------------------


def real_embeddings(data_dir: Path, max_tokens: int = 32) -> np.ndarray:
    """[R, 384] MiniLM embeddings of the real datasets' item texts (cached)."""
    path = CACHE / "real_items.npy"
    if path.is_file():
        return np.load(path)
    from recsys.config import ModelConfig
    from recsys.data.registry import load_dataset
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    from recsys.models.tower import encode_texts
    from recsys.models.two_tower import build_tower
    texts = []
    for name, folder in REAL_SOURCES:
        if (data_dir / folder).is_dir():
            ds = load_dataset(name, path=data_dir / folder)
            log(f"real items: {name}: {len(ds.item_texts)} texts")
            texts += list(ds.item_texts)
    if not texts:
        raise SystemExit(f"no real datasets under {data_dir} (expected {', '.join(f for _, f in REAL_SOURCES)})")
    tower = build_tower("minilm", ModelConfig(encoder="minilm"))
    tok = load_tokenizer(resolve_model_path("minilm"))
    log(f"encoding {len(texts)} item texts with MiniLM ({max_tokens} tokens)")
    emb = encode_texts(tower, tok, texts, max_tokens, 128, progress=False).numpy().astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


# --- 2. the generator -------------------------------------------------------------------------------------------


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
    out = {"n_items": n, "nlist": nlist, "ivf": [], "hnsw": []}
    ivf = _build(items, parse_index_spec(f"ivf,nlist={nlist},nprobe=1,k=10"), seed=seed)
    for p in (1, 2, 4, 8, 16, 32):
        if p <= nlist:
            ix = set_search_params(ivf, parse_index_spec(f"ivf,nlist={nlist},nprobe={p},k=10"))
            out["ivf"].append({"nprobe": p, "recall@10": recall_at(ix.search(queries, 10)[1], truth, 10)})
    hnsw = _build(items, parse_index_spec("hnsw,M=16,efConstruction=40,efSearch=16,k=10"), seed=seed)
    for e in (16, 32, 64, 128):
        ix = set_search_params(hnsw, parse_index_spec(f"hnsw,M=16,efConstruction=40,efSearch={e},k=10"))
        out["hnsw"].append({"ef_search": e, "recall@10": recall_at(ix.search(queries, 10)[1], truth, 10)})
    return out


# --- 3. catalogs, indexes and timings ---------------------------------------------------------------------------


def index_grid(n: int, hnsw_max: int) -> list[tuple[str, list[str]]]:
    """(build spec, [query-time specs sharing that build]) for a catalog of n items."""
    nlist = max(8, min(int(4 * math.sqrt(n)), n // 39))
    probes = [p for p in (4, 8, 16, 32, 64, 128) if p <= nlist]
    grid = [("flat,k=10", ["flat,k=10"]), ("sq8,k=10", ["sq8,k=10"]), ("fp16,k=10", ["fp16,k=10"]),
            (f"ivf,nlist={nlist},nprobe=1,k=10", [f"ivf,nlist={nlist},nprobe={p},k=10" for p in probes]),
            (f"ivfpq,nlist={nlist},nprobe=1,m=48,nbits=8,refine=10,k=10",
             [f"ivfpq,nlist={nlist},nprobe={p},m=48,nbits=8,refine=10,k=10" for p in probes if p >= 16])]
    if n <= hnsw_max:
        grid.append(("hnsw,M=16,efConstruction=40,efSearch=16,k=10",
                     [f"hnsw,M=16,efConstruction=40,efSearch={e},k=10" for e in (16, 32, 64, 128)]))
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_catalog(n: int, real_items: np.ndarray, real_queries: np.ndarray, gen: Generator, fingerprint: str,
                hnsw_max: int, rounds: int) -> dict:
    """One catalog size: exact against every index of `index_grid`."""
    n_real = min(len(real_items), n)
    log(f"== catalog {n:,} items ({n_real:,} real + {n - n_real:,} generated)")
    items = np.empty((n, real_items.shape[1]), dtype=np.float32)  # real items first, generated in place after
    items[:n_real] = real_items[:n_real]
    if n > n_real:
        gen.sample(n - n_real, seed=n, out=items[n_real:])
    queries = np.concatenate([real_queries, gen.sample(N_QUERIES - len(real_queries), seed=10 ** 9 + n)])
    items_t, queries_t = torch.from_numpy(items), torch.from_numpy(queries)
    truth = exact_topk(queries_t, items_t, 10, chunk=64).numpy()  # 64 × N scores at a time (256 MB at 1M)
    exact_b1, exact_b64 = exact_calls(queries_t, items_t, 1), exact_calls(queries_t, items_t, 64)
    big = n >= 500_000
    row = {"n_items": n, "n_real": n_real, "n_queries": N_QUERIES, "indexes": []}
    with exclusive():
        t = interleaved({"b1": exact_b1}, rounds=rounds, per_round=3 if big else 10, warmup=2)
        t64 = interleaved({"b64": exact_b64}, rounds=max(2, rounds // 2), per_round=1 if big else 3, warmup=1)
    row["exact"] = {"qps_b1": qps(t["b1"].p50, 1), "qps_b64": qps(t64["b64"].p50, 64), "ms_b1_p50": t["b1"].p50,
                    "ms_b64_p50": t64["b64"].p50, "memory_mb": items.nbytes / 2 ** 20}
    log(f"exact: {row['exact']['ms_b1_p50']:.2f} ms at batch 1 ({row['exact']['qps_b1']:.0f} QPS), "
        f"{row['exact']['qps_b64']:.0f} QPS at batch 64")
    for build_spec, specs in index_grid(n, hnsw_max):
        cfg = parse_index_spec(build_spec)
        folder = CACHE / f"n{n}" / build_key(cfg)
        index = load_index(folder, cfg, fingerprint) if (folder / "meta.json").is_file() else None
        if index is None:
            log(f"building {build_key(cfg)} over {n:,} items")
            index = _build(items, cfg, seed=0)
            save_index(index, folder, fingerprint)
        build_s, memory = index.build_s, index.memory_bytes() / 2 ** 20
        log(f"  built in {build_s:.1f} s, {memory:.0f} MiB")
        for spec in specs:
            ix = set_search_params(index, parse_index_spec(spec))
            rec = recall_at(ix.search(queries, 10)[1], truth, 10)
            with exclusive():
                b1 = interleaved({"index": search_calls(ix, queries, 1), "exact": exact_b1},
                                 rounds=rounds, per_round=3 if big else 10, warmup=2)
                b64 = interleaved({"index": search_calls(ix, queries, 64), "exact": exact_b64},
                                  rounds=max(2, rounds // 2), per_round=1 if big else 3, warmup=1)
            entry = {"spec": index_spec(ix.cfg), "recall@10": rec, "qps_b1": qps(b1["index"].p50, 1),
                     "qps_b64": qps(b64["index"].p50, 64), "build_s": build_s, "memory_mb": memory,
                     "ms_b1_p50": b1["index"].p50, "ms_b1_p90": b1["index"].p90,
                     "speedup_b1": b1["exact"].p50 / b1["index"].p50,
                     "speedup_b64": b64["exact"].p50 / b64["index"].p50}
            row["indexes"].append(entry)
            log(f"  {entry['spec']}: recall@10 {rec:.3f}, {entry['ms_b1_p50']:.3f} ms b1 "
                f"({entry['speedup_b1']:.1f}x exact), {entry['qps_b64']:.0f} QPS b64 ({entry['speedup_b64']:.1f}x)")
        del index, ix  # the last searched view holds the faiss index too: free it before the next build
        gc.collect()
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def bar(catalogs: list[dict]) -> dict:
    """The issue's bar at the largest catalog: the fastest index with recall@10 >= 0.95, and its speed-up."""
    big = max(catalogs, key=lambda c: c["n_items"])
    ok = [i for i in big["indexes"] if i["recall@10"] >= 0.95]
    best = max(ok, key=lambda i: i["speedup_b1"]) if ok else None
    return {"n_items": big["n_items"], "best": best, "met": bool(best and best["speedup_b1"] >= 20)}


# --- 4. NDCG@10 of a real dataset through each index --------------------------------------------------------------


def ndcg_through_indexes(run: Path) -> dict:
    from recsys.recipes.retrieval_index import evaluate_run_index
    from recsys.runs import load_run
    cfg, _ = load_run(run)
    n = json.loads((run / "metrics.json").read_text()).get("catalog_items", 1682)
    nlist = max(4, n // 39)
    specs = ["flat", "sq8", "fp16", f"ivf,nlist={nlist},nprobe={max(1, nlist // 8)}",
             f"ivf,nlist={nlist},nprobe={max(1, nlist // 2)}",
             f"ivfpq,nlist={nlist},nprobe={max(1, nlist // 2)},m=48,nbits=6,refine=10",
             "hnsw,M=16,efConstruction=40,efSearch=100", "hnsw,M=16,efConstruction=40,efSearch=200"]
    rows, exact = [], None
    for spec in specs:
        log(f"NDCG@10 of {run.name} (test) through {spec}")
        res = evaluate_run_index(run, spec, "test", progress=False)
        exact = res.exact.metrics
        rows.append({"spec": res.spec, "ndcg@10": res.index.metrics["ndcg@10"],
                     "recall@10": res.index.metrics["recall@10"], **{f"{k}_vs_exact": v for k, v in
                                                                     res.recall_vs_exact.items()},
                     "ndcg_vs_exact": res.index.metrics["ndcg@10"] / max(exact["ndcg@10"], 1e-12)})
    return {"run": str(run), "n_items": n, "exact": {"ndcg@10": exact["ndcg@10"], "recall@10": exact["recall@10"]},
            "indexes": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--run", default="results/runs/ml-100k-bench-seed0", help="a trained run for NDCG through "
                    "the indexes ('' to skip)")
    ap.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest catalog HNSW is built for")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds per index")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/benchmarks/retrieval_scale.json")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    set_faiss_threads(args.threads)
    blas = blas_info()
    log(f"threads {args.threads}; OPENBLAS_CORETYPE={CORETYPE}; BLAS: "
        + ", ".join(f"{b['internal_api']} {b['version']} {b['architecture']}" for b in blas["libraries"]))
    real = real_embeddings(Path(args.data_dir))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(real))
    n_q = min(N_QUERIES // 2, len(real) // 5)
    real_queries, real_items = real[order[:n_q]], real[order[n_q:]]
    fingerprint = hashlib.sha1(real.tobytes()).hexdigest()
    log(f"real: {len(real_items):,} catalog items + {n_q} held-out queries; fitting the generator")
    gen = Generator(real_items)
    log(f"generator: {len(gen.weights)} clusters; check at {len(real_items):,} items: real against generated")
    with threads(args.threads):
        check = {"real": recall_curve(real_items, real_queries),
                 "generated": recall_curve(gen.sample(len(real_items), seed=1), real_queries)}
        for kind in ("ivf", "hnsw"):
            log(f"  {kind} recall@10 real / generated: " + ", ".join(
                f"{a['recall@10']:.3f}/{b['recall@10']:.3f}" for a, b in zip(check["real"][kind],
                                                                              check["generated"][kind], strict=True)))
        catalogs = []
        for n in sizes:
            catalogs.append(run_catalog(n, real_items, real_queries, gen, fingerprint, args.hnsw_max, args.rounds))
            gc.collect()
        ndcg = ndcg_through_indexes(Path(args.run)) if args.run and Path(args.run, "metrics.json").is_file() else None
    result = {"catalogs": catalogs, "bar": bar(catalogs), "generator_check": check, "ndcg": ndcg,
              "generator": {"clusters": len(gen.weights), "rank": 16, "real_items": len(real_items),
                            "real_queries": n_q, "sources": [f for _, f in REAL_SOURCES]},
              "threads": args.threads, "blas": blas, "openblas_coretype": CORETYPE, "peak_rss_mb": peak_rss_mb()}
    write_benchmark(args.out, result)
    b = result["bar"]
    log(f"wrote {args.out}; peak RSS {result['peak_rss_mb']:.0f} MiB; bar at {b['n_items']:,} items: "
        + (f"{b['best']['spec']} recall@10 {b['best']['recall@10']:.3f} at {b['best']['speedup_b1']:.1f}x exact "
           f"({'met' if b['met'] else 'not met'})" if b["best"] else "no index reaches recall@10 0.95"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
