"""User-tower families on the accuracy–latency front (issue 17): SASRec, the sequence tower, the text two-tower, EASE^R.

    python experiments/user_towers.py --dataset ml-100k --data-dir ../shared/datasets --text-item-tower
    python experiments/user_towers.py --dataset ml-1m --path ../shared/datasets/ml-1m-subset --text-seeds 0,1,2

→ results/benchmarks/{ml100k,ml1m}_user_towers.json: one row per model (test split, full ranking; trained models
the mean of 3 seeds) with its online request at batch 1 measured interleaved in one process (2 threads): the text
two-tower's user tower over 128 tokens + exact retrieval; the sequence tower over its N cached item vectors +
exact retrieval; SASRec over its last max_len item ids + scoring the catalog; EASE^R a history row × B.
`notebooks/user_towers.ipynb` draws accuracy against latency.

What it trains, each step resumable (finished pieces are read back from results/user_towers/<dataset>/ and
results/runs/):
- SASRec: the validation grid (recsys.config.SASRecConfig: hidden × dropout × max_len, ≤ 3 min each) with seed 0,
  then the chosen point with seeds 1, 2 — ≈ 15–30 min on ML-100K, ≈ 30–40 min on the ML-1M subset (2 cores).
- The sequence tower (configs/ml100k_sequence.yaml, frozen MiniLM item tower): 3 seeds × ≤ 6 min.
- The text two-tower: ML-100K reuses the committed numbers (results/benchmarks/ml100k_baselines.json, 3 seeds) and
  results/runs/ml-100k-bench-seed0 for latency; on another dataset `--text-seeds` trains it (configs/ml100k.yaml,
  ≈ 15–25 min per seed), without them the row is left out.
- With `--text-item-tower`: the sequence tower again, over the text two-tower's fine-tuned item tower
  (`model.item_tower_from=<text run>`, frozen) instead of the zero-shot encoder — 3 seeds × ≈ 3.5 min; its
  train_minutes include the text run's. (ML-100K's runs of it were trained from the same weights exported to a
  Hugging Face folder: their item-tower weights equal the text run's exactly.)
- EASE^R: λ chosen on validation (seconds on ML-100K, ≈ 1 min on ML-1M).
Expected total on 2 cores: ≈ 45–60 min on ML-100K; ≈ 1.5 h on the ML-1M subset plus 3 text seeds (≈ 1 h more).
`--smoke` runs everything at toy size on the synthetic dataset (a minute), for tests.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from common import exit_with, train_or_reuse, tuned_input, write_benchmark

from recsys.config import SASRecConfig, load_config
from recsys.data.registry import dataset_slug, load_data
from recsys.efficiency.latency import exclusive, interleaved, threads
from recsys.models.sasrec import SASRec, fit_sasrec, left_padded, run_sasrec, sasrec_scorer
from recsys.recipes.evaluate import evaluate_run
from recsys.recipes.profile import online_request
from recsys.retrieval.baselines import ease_weights, run_ease
from recsys.retrieval.evaluate import evaluate
from recsys.tracking.records import write_json

METRICS = ("ndcg@10", "recall@10", "ndcg@20", "recall@20")
SMOKE = ["data.name=synthetic", "data.synthetic_users=120", "data.synthetic_items=150"]


def mean_rows(rows: list[dict]) -> dict:
    out = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    out.update({f"{k}_std": float(np.std([r[k] for r in rows])) for k in ("ndcg@10", "recall@10")})
    return out


def sasrec_seeds(split, cfg: SASRecConfig, seeds: list[int], folder: Path) -> tuple[dict, SASRec]:
    """The grid on validation with the first seed, then the chosen point with the other seeds (each cached)."""
    rows, chosen, first_model = [], None, None
    for seed in seeds:
        path = folder / f"sasrec_seed{seed}.json"
        weights = folder / f"sasrec_seed{seed}.pt"
        if path.is_file() and weights.is_file():
            rows.append(json.loads(path.read_text()))
        else:
            print(f"== sasrec seed {seed}" + (" (validation grid)" if chosen is None else ""), flush=True)
            if chosen is None:
                test, info = run_sasrec(split, replace(cfg, seed=seed), progress=True, keep_model=True)
                model = info.pop("model")
            else:
                point = replace(cfg, seed=seed, hidden=[chosen["hidden"]], dropout=[chosen["dropout"]],
                                max_len=[chosen["max_len"]])
                model, fit = fit_sasrec(split, point, chosen["hidden"], chosen["dropout"], chosen["max_len"], True)
                test = evaluate(sasrec_scorer(model, split, "test"), split, "test", progress=False)
                info = {"hidden": chosen["hidden"], "dropout": chosen["dropout"], "max_len": chosen["max_len"],
                        "val": fit["val"], "train_minutes": fit["train_minutes"]}
            torch.save(model.state_dict(), weights)
            write_json(path, {"seed": seed, "test": test.metrics, **info})
            rows.append(json.loads(path.read_text()))
        chosen = chosen or rows[0]
    r0 = rows[0]
    first_model = SASRec(split.n_items, r0["hidden"], r0["max_len"], cfg.n_layers, cfg.n_heads, r0["dropout"])
    first_model.load_state_dict(torch.load(folder / f"sasrec_seed{seeds[0]}.pt", weights_only=True))
    summary = {"name": "sasrec", **mean_rows([r["test"] for r in rows]), "n_seeds": len(rows),
               "train_minutes": float(np.mean([r["train_minutes"] for r in rows])),
               "hyperparameters": {k: r0[k] for k in ("hidden", "dropout", "max_len")},
               "grid": r0.get("grid"), "per_seed_ndcg@10": [r["test"]["ndcg@10"] for r in rows]}
    return summary, first_model.eval()


def sasrec_call(model: SASRec, n_history: int, k: int = 10):
    """SASRec's online request: the last max_len item ids at batch 1 → last state → catalog scores → top-k."""
    g = torch.Generator().manual_seed(0)
    seq = left_padded([torch.randint(0, model.n_items, (n_history,), generator=g).numpy()], model.max_len)
    return lambda: torch.topk(model.logits(model(seq)[:, -1]), k).indices


def ease_call(weights: np.ndarray, history: int, k: int = 10):
    """EASE^R's online request: a user's binary history row × B [N, N] → top-k, computed as the sum of B's rows of
    the `history` items (what the sparse row × B is; a dense [1, N] × [N, N] product does N² work instead)."""
    w = torch.from_numpy(weights).float()
    items = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:history]
    return lambda: torch.topk(w[items].sum(0), k).indices


def text_item_tower(text_run: Path) -> list[str]:
    """Overrides that put the text two-tower's fine-tuned item tower under the sequence tower
    (`model.item_tower_from`, frozen by configs/ml100k_sequence.yaml), with the run's item encoder and token budget."""
    from recsys.runs import run_config, run_paths

    cfg = run_config(run_paths(text_run)[0])  # its config alone: the weights are read by the training run
    return [f"model.item_tower_from={text_run}", f"model.encoder={cfg.model.item_encoder or cfg.model.encoder}",
            f"data.item_max_tokens={cfg.data.item_max_tokens}"]


def run_row(name: str, runs: list[Path]) -> dict:
    ms = [json.loads((r / "metrics.json").read_text()) for r in runs]
    return {"name": name, **mean_rows([m["test"] for m in ms]), "n_seeds": len(ms),
            "train_minutes": float(np.mean([m["train_minutes"] for m in ms])), "runs": [str(r) for r in runs],
            "per_seed_ndcg@10": [m["test"]["ndcg@10"] for m in ms]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m", "synthetic"])
    ap.add_argument("--path", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--text-seeds", default=None, help="train the text two-tower with these seeds (not ML-100K)")
    ap.add_argument("--text-run", default=None, help="a finished text run for latency (ML-100K: the bench run)")
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", default=None, help="default: results/benchmarks/<ml100k|ml1m>_user_towers.json")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the synthetic dataset (tests)")
    ap.add_argument("--encoder", default="minilm", help="--smoke: the encoder (a tiny BERT folder in tests)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--text-item-tower", action="store_true",
                    help="also a sequence tower over the text two-tower's fine-tuned (frozen) item vectors")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = Path(args.results)
    data = [f"data.name={args.dataset}"] + [f"data.{k}={v}" for k, v in (("path", args.path),
                                                                        ("data_dir", args.data_dir)) if v]
    seq_over, text_over, sas_over = [], [], []
    if args.smoke:
        data = SMOKE
        seq_over = [f"model.encoder={args.encoder}", "data.item_max_tokens=16", "model.sequence_items=8",
                    "model.sequence_layers=1", "train.epochs=1", "train.examples_per_user=2"]
        text_over = [f"model.encoder={args.encoder}", "data.user_max_tokens=32", "data.item_max_tokens=16",
                     "train.epochs=1", "train.examples_per_user=2", "train.max_minutes=1"]
        sas_over = ["sasrec.hidden=[16]", "sasrec.dropout=[0.2]", "sasrec.max_len=[10]", "sasrec.epochs=2",
                    "sasrec.eval_every=1"]
    cfg = load_config(None, [*data, *sas_over])
    slug = dataset_slug(cfg.data)
    short = slug.replace("-", "")
    folder = results / "user_towers" / slug
    folder.mkdir(parents=True, exist_ok=True)
    ds, split = load_data(cfg.data)
    print(f"== {slug}: {split.n_users} users, {split.n_items} items", flush=True)

    # EASE^R: λ on validation; its weights kept for its request
    ease_path = folder / "ease.json"
    if not ease_path.is_file():
        print("== ease", flush=True)
        test, info = run_ease(split, progress=False)
        write_json(ease_path, {"test": test.metrics, "lambda": info["lambda"], "val": info["val"]})
    ease = json.loads(ease_path.read_text())
    weights = ease_weights(split.matrix("val"), ease["lambda"])
    rows = {"ease": {"name": "ease", **{k: ease["test"][k] for k in METRICS}, "n_seeds": 1, "train_minutes": 0.0,
                     "hyperparameters": {"lambda": ease["lambda"]}}}

    rows["sasrec"], sasrec = sasrec_seeds(split, cfg.sasrec, seeds, folder)

    config = "configs/ml100k_sequence.yaml"
    seq_runs = [train_or_reuse(config, [*data, *seq_over, f"train.seed={s}"], f"{slug}-sequence-seed{s}", results)
                for s in seeds]
    rows["sequence_tower"] = run_row("sequence_tower", seq_runs)

    text_run = Path(args.text_run) if args.text_run else None
    if args.dataset == "ml-100k" and not args.text_seeds:  # the committed 3-seed numbers and the seed-0 run
        bench = json.loads(Path("results/benchmarks/ml100k_baselines.json").read_text())["models"]["two_tower"]
        text_run = text_run or Path("results/runs/ml-100k-bench-seed0")
        rows["text_two_tower"] = {"name": "text_two_tower", **{k: bench[k] for k in METRICS},
                                  "n_seeds": len(bench.get("seeds", [])) or 3, "train_minutes": 14.0,
                                  "source": "results/benchmarks/ml100k_baselines.json"}
    elif args.text_seeds or args.smoke:
        text_seeds = [int(s) for s in (args.text_seeds or "0").split(",")]
        text_runs = [train_or_reuse("configs/ml100k.yaml", [*data, *text_over, f"train.seed={s}"],
                                    f"{slug}-text-seed{s}", results) for s in text_seeds]
        rows["text_two_tower"] = run_row("text_two_tower", text_runs)
        text_run = text_run or text_runs[0]
    else:
        print("== text two-tower: no run (pass --text-seeds 0,1,2 to train it); its row is left out", flush=True)
    # the sequence tower over the text two-tower's fine-tuned item vectors (frozen): a two-stage model whose
    # training time includes the text run's
    seq_text_runs = []
    if args.text_item_tower and text_run is not None:
        item_tower = text_item_tower(text_run)
        seq_text_runs = [train_or_reuse(config, [*data, *seq_over, *item_tower, f"train.seed={s}"],
                                        f"{slug}-sequence-ft-seed{s}", results) for s in seeds]
        rows["sequence_tower_text_items"] = run_row("sequence_tower_text_items", seq_text_runs)
        rows["sequence_tower_text_items"]["train_minutes"] += rows["text_two_tower"]["train_minutes"]
        rows["sequence_tower_text_items"]["item_tower"] = f"{text_run} (fine-tuned, frozen; model.item_tower_from)"
    # the text run served at its input length chosen on validation (issue 16: the honest dense reference), when
    # experiments/ml100k_pareto.py has chosen it: test metrics of that one run, and its own request below
    tuned_over = tuned_input(results / "sweeps", text_run) if text_run else None
    if tuned_over is not None:
        test = evaluate_run(text_run, "test", progress=False, overrides=tuned_over).metrics
        rows["text_two_tower_tuned_input"] = {
            "name": "text_two_tower_tuned_input", **{k: test[k] for k in METRICS}, "n_seeds": 1,
            "train_minutes": rows["text_two_tower"]["train_minutes"], "serving_overrides": tuned_over,
            "source": f"{text_run} at the input length best on validation "
                      f"({results / 'sweeps' / f'reference-input-{text_run.name}.json'})"}

    # latency: every row's online request at batch 1, interleaved in one process under the measurement lock
    calls, costs = {}, {}
    calls["sequence_tower"], costs["sequence_tower"] = online_request(seq_runs[0])
    if text_run is not None:
        calls["text_two_tower"], costs["text_two_tower"] = online_request(text_run)
    if seq_text_runs:
        calls["sequence_tower_text_items"], costs["sequence_tower_text_items"] = online_request(seq_text_runs[0])
    if tuned_over is not None:
        calls["text_two_tower_tuned_input"], costs["text_two_tower_tuned_input"] = online_request(
            text_run, overrides=tuned_over)
    calls["sasrec"] = sasrec_call(sasrec, int(np.median([len(s) for s in split.train])))
    calls["ease"] = ease_call(weights, int(np.median([len(s) for s in split.train])))
    print("== measuring online latency, interleaved", flush=True)
    with threads(None), exclusive():
        timings = interleaved(calls, rounds=args.rounds, per_round=5)
    for name, t in timings.items():
        rows[name]["measured_ms_median"] = t.p50
        rows[name]["measured_ms_p90"] = t.p90
        if name in costs:
            rows[name]["user_params"], rows[name]["online_flops"] = costs[name]["params"], costs[name]["flops"]
    out = {"dataset": slug, "rows": list(rows.values()), "catalog_items": split.n_items,
           "sasrec_config": asdict(cfg.sasrec), "protocol": "leave-last-out, full ranking, test split"}
    if "text_two_tower" in rows:
        text, seq = rows["text_two_tower"], rows["sequence_tower"]
        out["bar"] = {"speedup_vs_text": text["measured_ms_median"] / seq["measured_ms_median"],
                      "ndcg_vs_text": seq["ndcg@10"] / text["ndcg@10"], "needs": {"speedup": 10, "ndcg_ratio": 0.97}}
    if "text_two_tower_tuned_input" in rows:  # the same bar against the text model at its tuned input length
        text, seq = rows["text_two_tower_tuned_input"], rows["sequence_tower"]
        out["bar_vs_tuned_input"] = {"speedup_vs_text": text["measured_ms_median"] / seq["measured_ms_median"],
                                     "ndcg_vs_text": seq["ndcg@10"] / text["ndcg@10"],
                                     "needs": {"speedup": 10, "ndcg_ratio": 0.97}}
    if "sequence_tower_text_items" in rows and "text_two_tower" in rows:  # the bar, for the two-stage variant
        seq = rows["sequence_tower_text_items"]
        out["bar_text_items"] = {
            name: {"speedup_vs_text": rows[name]["measured_ms_median"] / seq["measured_ms_median"],
                   "ndcg_vs_text": seq["ndcg@10"] / rows[name]["ndcg@10"], "needs": {"speedup": 10, "ndcg_ratio": 0.97}}
            for name in ("text_two_tower", "text_two_tower_tuned_input") if name in rows}
    best = max(rows.values(), key=lambda r: r["ndcg@10"])
    out["aim"] = {"best": best["name"], "vs_ease": best["ndcg@10"] / rows["ease"]["ndcg@10"], "needs": 1.10}
    path = Path(args.out or results / "benchmarks" / f"{short}_user_towers.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_benchmark(path, out)
    for r in rows.values():
        print(f"{r['name']:16s} ndcg@10 {r['ndcg@10']:.4f}  recall@10 {r['recall@10']:.4f}  "
              f"{r['measured_ms_median']:.3f} ms  ({r['n_seeds']} seeds, {r['train_minutes']:.1f} min)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    exit_with(main)
