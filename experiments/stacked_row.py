"""The stacked row (issue 18 §5, issue 26): structure × int8 × index, against the dense fp32 model with exact search;
every index recall measured on the model's own user queries (item-like queries beside, labelled).

    python experiments/stacked_row.py --data-dir ../shared/datasets    # ≈ 10-15 min on 2 CPU cores, < 6 GB
    (after experiments/ml100k_pareto.py, ml100k_structure.py and retrieval_scale.py, whose outputs it reads)

→ results/benchmarks/stacked_row.json

1. MovieLens-100K, the largest real catalog with trained runs here (1,682 items): test NDCG@10 of
   - dense: the reference run at the input length chosen on validation (issue 16), fp32, exact search;
   - stacked: the fastest structure-only model within 97% of dense on validation (`ml100k_structure.json`'s pick;
     where the λ study has none, the post-hoc study's pick, and the JSON says which), its user tower served int8
     (`--int8-backend`, post-training), its catalog searched through `--index` — by default IVF tuned to recall@10
     0.95 on the run's validation users (`recsys.retrieval.index_tuning`; the tuned nprobe is recorded) — user
     embeddings of the test users from the served tower, metrics from the index's candidates
     (`recsys.retrieval.index_eval.evaluate_index`), and the same user embeddings ranked exactly (what the index
     costs in accuracy). Its recall@10 against exact: on those test users (history masked, as ranked, and its own
     top 10), and on item queries (500 catalog items, labelled: issue 18's kind of query).
   Online requests at batch 1 (user tower + search), interleaved in one process: dense, structure fp32 exact,
   structure int8 exact, stacked.
2. 1,000,000 items in the structure run's own space: its item tower over the real item texts (ML-1M subset, MIND
   sample, ML-100K) extended by `retrieval_scale.Generator`, and its users: validation user vectors (real + generated
   by a Generator fitted to them) to tune `--big-index` (default: IVF, nlist 4000, tuned to recall@10 0.95), test
   user vectors (real + generated) to report its recall@10 against exact; item queries beside. Timed: the same user
   towers, each followed by a search over the 1M items: exact (torch matmul + top-k) for dense, the tuned index for
   stacked.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from recsys.serving.index_route import set_blas_coretype  # noqa: E402

CORETYPE = set_blas_coretype()  # before faiss (and its OpenBLAS) is loaded

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import exit_with, tuned_input, write_benchmark  # noqa: E402
from retrieval_scale import N_ROUTER, Generator, real_texts, run_space  # noqa: E402

from recsys.config import parse_index_spec  # noqa: E402
from recsys.data.text import user_text  # noqa: E402
from recsys.efficiency.latency import exclusive, interleaved, threads  # noqa: E402
from recsys.errors import RecsysError  # noqa: E402
from recsys.models.encoder import load_tokenizer, resolve_model_path  # noqa: E402
from recsys.models.tower import encode_texts  # noqa: E402
from recsys.recipes.evaluate import evaluate_run, served_tower  # noqa: E402
from recsys.recipes.profile import online_request  # noqa: E402
from recsys.recipes.retrieval_index import online_request_index, run_index  # noqa: E402
from recsys.retrieval.index import build_index, exact_topk, recall_at  # noqa: E402
from recsys.retrieval.index_eval import evaluate_index  # noqa: E402
from recsys.retrieval.index_tuning import tune_index  # noqa: E402
from recsys.runs import load_run  # noqa: E402
from recsys.serving.index_route import blas_info, index_request_calls, request_call  # noqa: E402
from recsys.serving.materialize import materialize  # noqa: E402
from recsys.serving.quantize import route_for  # noqa: E402


def structure_run(structure_json: Path) -> tuple[Path, str]:
    """The structure-only model the stack starts from, and where it came from."""
    s = json.loads(structure_json.read_text())
    if s.get("best"):
        run = next(r["run"] for r in s["runs"] if r["kind"] == "best" and r["seed"] == 0)
        return Path(run), "λ search: ml100k_structure.json best (seed 0)"
    pick = (s.get("posthoc_selection") or {}).get("pick")
    if not pick:
        raise RecsysError(f"{structure_json}: no structure-only model within the share of dense in either study")
    run = Path("results/sweeps") / s["posthoc_selection"]["study"] / "runs" / f"trial-{pick['trial']:04d}"
    return run, (f"post-hoc pruning trial {pick['trial']} (no λ trial reaches {s['selection']['share_of_dense']:.0%}"
                 f" of dense on validation): {pick['overrides']}")


def served_users(run: Path, spec: str, overrides: list[str]):
    """(test evaluation through the index — tuned on validation users when `spec` has a recall target — of `run`'s
    users encoded by its served (int8) user tower, and the index's recall on item queries)."""
    cfg, module, ds, split, _, keys, index = run_index(run, spec, progress=False, overrides=overrides)
    tok = load_tokenizer(resolve_model_path(cfg.model.encoder))
    texts = [user_text(ds.item_texts, split.history(int(u), "test"), cfg.data.history_items)
             for u in split.eval_users]
    users = encode_texts(served_tower(module.user_tower, cfg), tok, texts, cfg.data.user_max_tokens,
                         cfg.train.eval_batch_size, progress=False)
    through = evaluate_index(users, keys, index, split, "test", cfg.train.eval_batch_size)
    sample = keys[torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))[:500]].float()
    item_recall = recall_at(index.search(sample, 10)[1], exact_topk(sample, keys.float(), 10).numpy(), 10)
    return through, item_recall


def big_catalog(run: Path, data_dir: Path, n_items: int, spec: str) -> dict:
    """The 1M-item catalog in `run`'s space, the index `spec` over it (tuned on validation user queries when it has a
    recall target; probe vectors fitted to them for probe=queries), and its recall on test user / item queries."""
    texts = real_texts(data_dir)
    space = run_space(run, texts)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(space.keys))
    item_queries, real = space.keys[order[:500]], space.keys[order[500:]]
    item_gen, user_gen = Generator(real), Generator(space.val_users)
    catalog = np.empty((n_items, real.shape[1]), dtype=np.float32)
    n_real = min(len(real), n_items)
    catalog[:n_real] = real[:n_real]
    if n_items > n_real:
        item_gen.sample(n_items - n_real, seed=1, out=catalog[n_real:])
    test = np.concatenate([space.test_users[:500], user_gen.sample(500, seed=2)])
    val = np.concatenate([space.val_users[1::2], user_gen.sample(500, seed=3)])  # tuning; disjoint from the router's
    fit = space.val_users[0::2]
    router = np.concatenate([fit, user_gen.sample(max(0, N_ROUTER - len(fit)), seed=4)])
    iq = np.concatenate([item_queries, item_gen.sample(500, seed=5)])
    cfg = parse_index_spec(spec)
    cat = torch.from_numpy(catalog)
    print(f"1M: building {spec} over {n_items:,} items of {run.name}'s space", flush=True)
    index = build_index(catalog, cfg, queries=router if cfg.probe == "queries" else None)
    tuning = None
    if cfg.recall:
        index, tuning = tune_index(index, torch.from_numpy(val), cat, what="validation user queries")
        print(f"1M: tuned on {len(val):,} validation user queries: {tuning.param}={tuning.value} "
              f"(recall@10 {tuning.recall:.3f})", flush=True)

    def recall(q):
        return recall_at(index.search(q, 10)[1], exact_topk(torch.from_numpy(q), cat, 10, chunk=64).numpy(), 10)
    return {"catalog": cat, "index": index, "space": space, "summary": {
        "n_items": n_items, "space": str(run), "big_index": spec, "spec": index.spec,
        "tuning": tuning.to_dict() if tuning else None, "recall@10": recall(test), "queries": "test users",
        "n_queries": len(test), "n_real_user_queries": min(500, len(space.test_users)),
        "recall@10_item_queries": recall(iq), "n_item_queries": len(iq)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="results/runs/ml-100k-bench-seed0")
    ap.add_argument("--structure-json", default="results/benchmarks/ml100k_structure.json")
    ap.add_argument("--index", default="ivf,nlist=40,recall=0.95,k=100", help="index over the real catalog (a "
                    "recall target: tuned on the run's validation users)")
    ap.add_argument("--big-index", default="ivf,nlist=4000,recall=0.95,k=10", help="index over the 1M catalog "
                    "(tuned on validation user queries; e.g. add probe=queries for the query-aware IVF)")
    ap.add_argument("--sweeps-dir", default="results/sweeps", help="where ml100k_pareto.py cached the dense run's "
                    "validation-tuned input")
    ap.add_argument("--n-items", type=int, default=1_000_000)
    ap.add_argument("--int8-backend", default="torchao")
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default="results/benchmarks/stacked_row.json")
    args = ap.parse_args(argv)
    dense = Path(args.dense)
    dense_over = tuned_input(args.sweeps_dir, dense)
    if dense_over is None:
        raise RecsysError(f"no validation-tuned input length for {dense}: run experiments/ml100k_pareto.py first")
    struct, source = structure_run(Path(args.structure_json))
    int8 = ["compress.precision=int8", f"compress.int8_backend={args.int8_backend}"]
    print(f"dense {dense} {dense_over}; structure {struct} ({source})", flush=True)

    # 1. accuracy on the real catalog (test)
    acc = {"dense": evaluate_run(dense, "test", progress=False, overrides=dense_over).metrics,
           "structure": evaluate_run(struct, "test", progress=False).metrics,
           "structure_int8": evaluate_run(struct, "test", progress=False, overrides=int8, served=True).metrics}
    through, item_recall = served_users(struct, args.index, int8)
    acc["stacked"] = through.index.metrics
    for k, m in acc.items():
        print(f"{k:16s} test NDCG@10 {m['ndcg@10']:.4f}", flush=True)

    # 1b. online requests over the real catalog, interleaved
    calls = {"dense": online_request(dense, overrides=dense_over)[0],
             "structure": online_request(struct)[0],
             "structure_int8": online_request(struct, overrides=int8)[0],
             "stacked": online_request_index(struct, args.index, overrides=int8)[0]}
    with threads(None), exclusive():
        real = interleaved(calls, rounds=args.rounds, per_round=5)

    # 2. the same user towers over a 1M catalog in the structure run's space, its index tuned on user queries
    big_run = big_catalog(struct, Path(args.data_dir), args.n_items, args.big_index)
    catalog, big = big_run["catalog"], big_run["index"]
    print(f"1M: {big.spec}: recall@10 {big_run['summary']['recall@10']:.3f} on test user queries "
          f"({big_run['summary']['recall@10_item_queries']:.3f} on item queries)", flush=True)
    d_cfg, d_mod = load_run(dense, dense_over)
    d_user, _ = index_request_calls(materialize(d_mod.user_tower), d_cfg.data.user_max_tokens, big, "fp32")
    s_cfg, s_mod = load_run(struct, int8)
    s_user, _ = index_request_calls(materialize(s_mod.user_tower), s_cfg.data.user_max_tokens, big,
                                    route_for(s_cfg.compress.precision, s_cfg.compress.int8_backend),
                                    s_cfg.compress.quantize_layers)

    def exact_request():
        u = d_user()
        u = (u[0] if isinstance(u, (tuple, list)) else u).reshape(1, -1).float()
        return torch.topk(u @ catalog.T, 10).indices

    with threads(None), exclusive():
        at_1m = interleaved({"dense_exact": exact_request, "stacked": request_call(s_user, big)},
                            rounds=max(4, args.rounds // 2), per_round=3)

    def row(name, ms_dense, t, metrics=None):
        r = {"name": name, "measured_ms_median": t.p50, "measured_ms_p90": t.p90, "speedup": ms_dense / t.p50}
        if metrics is not None:
            r.update({"ndcg@10": metrics["ndcg@10"], "recall@10": metrics["recall@10"],
                      "ndcg_share_of_dense": metrics["ndcg@10"] / acc["dense"]["ndcg@10"]})
        return r

    out = {"dataset": "ml-100k", "catalog_items": json.loads((dense / "metrics.json").read_text()).get("catalog_items"),
           "dense": {"run": str(dense), "serving_overrides": dense_over},
           "structure": {"run": str(struct), "source": source},
           "int8": {"backend": args.int8_backend, "kind": "post-training (simulated for accuracy, real kernels timed)"},
           "index": args.index, "index_spec": through.spec, "index_tuning": through.tuning,
           "index_recall_vs_exact": through.recall_vs_exact,  # test users of the served tower, history masked
           "index_ann_recall@10": through.ann_recall,  # the same users, the index's own top 10
           "index_recall@10_item_queries": item_recall,  # 500 catalog items as queries (issue 18's kind)
           "stacked_exact_ndcg@10": through.exact.metrics["ndcg@10"],
           "rows": [row(n, real["dense"].p50, real[n], acc[n]) for n in calls],
           "at_1m": {**big_run["summary"], "rows": [row(n, at_1m["dense_exact"].p50, at_1m[n]) for n in at_1m]},
           "blas": {"OPENBLAS_CORETYPE": CORETYPE, **blas_info()}}
    stacked = next(r for r in out["rows"] if r["name"] == "stacked")
    out["aim"] = {"speedup": stacked["speedup"], "ndcg_share_of_dense": stacked["ndcg_share_of_dense"],
                  "needs": {"speedup": 10, "ndcg_share": 0.97}}
    write_benchmark(args.out, out)
    for r in out["rows"] + out["at_1m"]["rows"]:
        print(f"{r['name']:16s} {r['measured_ms_median']:8.2f} ms  {r['speedup']:6.2f}x  "
              f"{r.get('ndcg@10', float('nan')):.4f}", flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    exit_with(main)
