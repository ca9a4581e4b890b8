"""Reproduce results/benchmarks/ml100k_pareto.json and results/figures/ml100k_pareto_front.png: the λ-search
front against the post-hoc pruning front on MovieLens-100K, same trials, same training steps per trial, same
reference.

    python experiments/ml100k_baselines.py --data-dir ../shared/datasets   # the dense run both fronts start from
    python experiments/ml100k_pareto.py --data-dir ../shared/datasets      # ≈ 2 hours on 2 CPU cores, resumable

The recipe is the sweep config (default configs/sweeps/ml100k_recipe.yaml; configs/sweeps/ml100k_lambda.yaml
is the first one). The dense reference is served at the input length (token budget, history items) that scores
best on validation, chosen here over a grid unless the sweep config sets `reference_overrides`. Both studies
live in journal files under results/sweeps/; re-running resumes them where they stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from common import read_input_grid, write_benchmark, write_input_grid

from recsys.errors import RecsysError
from recsys.search.posthoc import posthoc_config
from recsys.search.report import compare_fronts
from recsys.search.study import load_sweep
from recsys.search.sweep import sweep


def _points(summary: dict, objectives: list[str]) -> list[tuple[float, float]]:
    return [(p[f"val_{objectives[1]}"], p[f"val_{objectives[0]}"]) for p in summary["pareto"]]


def figure(lam: dict, post: dict, objectives: list[str], out: Path) -> None:
    """Both studies' trials and fronts: cost (x) against validation accuracy (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    draw_fronts(ax, lam, post, objectives)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)


def draw_fronts(ax, lam: dict, post: dict, objectives: list[str]) -> None:
    """The λ front and the post-hoc front on `ax`: cost (x) against validation accuracy (y), the dense reference."""
    for summary, label, color in ((lam, "λ search", "tab:blue"), (post, "post-hoc pruning", "tab:orange")):
        pts = sorted(_points(summary, objectives))
        ax.step([x for x, _ in pts], [y for _, y in pts], where="post", color=color, alpha=0.6)
        ax.scatter([x for x, _ in pts], [y for _, y in pts], color=color,
                   label=f"{label} (HV {summary['hypervolume']:.3f})")
    ref = lam["reference"]
    ax.scatter([ref[objectives[1]]], [ref[objectives[0]]], marker="*", s=150, color="black", label="dense")
    ax.set_xlabel(f"{objectives[1]} (online, measured)" + (" [ms]" if objectives[1] == "latency" else ""))
    ax.set_ylabel(f"validation {objectives[0]}")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)


def tune_reference(cfg, tokens: list[int], history: list[int]) -> dict:
    """The dense reference's input length chosen on validation (cached beside the studies)."""
    from recsys.recipes.evaluate import input_length_grid

    cache = cfg.folder.parent / f"reference-input-{Path(cfg.reference_run).name}.json"
    if cache.is_file():
        grid = read_input_grid(cache)
    else:
        grid = input_length_grid(cfg.reference_run, tokens, history, "val")
        write_input_grid(cache, grid)
    best = max(grid, key=lambda r: r["ndcg@10"])
    return {"grid_val": grid, "chosen": {k: best[k] for k in ("user_max_tokens", "history_items", "ndcg@10")}}


def training_steps(cfg) -> dict:
    """Training steps of every finished trial of a study (equal compute: both studies' should match)."""
    steps = [json.loads(m.read_text())["steps"] for m in sorted((cfg.folder / "runs").glob("*/metrics.json"))]
    return {"per_trial_mean": sum(steps) / len(steps) if steps else None, "total": sum(steps), "trials": len(steps)}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def prepare_reference(cfg, tokens: list[int], history: list[int]) -> dict | None:
    """The dense reference's input length chosen on validation when the sweep asks for it (`tune_reference_input`
    and no `reference_overrides`): sets `cfg.reference_overrides`, returns the tuning record (None otherwise)."""
    if not (cfg.reference_run and cfg.tune_reference_input and not cfg.reference_overrides):
        return None
    reference_input = tune_reference(cfg, tokens, history)
    chosen = reference_input["chosen"]
    cfg.reference_overrides = [f"data.user_max_tokens={chosen['user_max_tokens']}",
                               f"data.history_items={chosen['history_items']}"]
    print(f"dense reference served at {chosen} (best on validation)", flush=True)
    return reference_input


def run_both(cfg, workers: int = 1) -> dict:
    """The λ study and its post-hoc twin (same trials, steps, objectives and reference), run or resumed: their
    report summaries, the post-hoc config, the comparison of their fronts and this invocation's wall seconds."""
    t0 = time.perf_counter()
    lam = sweep(cfg, workers=workers)
    post_cfg = posthoc_config(cfg)
    post = sweep(post_cfg, workers=workers)
    return {"lam": lam, "post": post, "post_cfg": post_cfg, "cmp": compare_fronts(cfg, post_cfg),
            "wall": time.perf_counter() - t0}


def front_rows(lam: dict, post: dict) -> tuple[list[dict], list[dict]]:
    """Both fronts' trials as the benchmark JSON lists them: parameters, validation and test metrics, latency."""
    pareto = [{"trial": p["trial"], "params": {k[6:]: v for k, v in p.items() if k.startswith("param_")},
               "val": {k[4:]: v for k, v in p.items() if k.startswith("val_")},
               "test": {k[5:]: v for k, v in p.items() if k.startswith("test_")},
               "measured_ms_median": p.get("val_latency")} for p in lam["pareto"]]
    posthoc = [{"trial": p["trial"], "prune_ratio": p.get("param_compress.prune_ratio"),
                "val": {k[4:]: v for k, v in p.items() if k.startswith("val_")},
                "test": {k[5:]: v for k, v in p.items() if k.startswith("test_")},
                "measured_ms_median": p.get("val_latency")} for p in post["pareto"]]
    return pareto, posthoc


def timing(lam: dict, post: dict, wall: float, previous: dict | None) -> dict:
    """This invocation's wall minutes and overhead; one that had nothing left to train keeps the timing of the
    run that trained (`previous`: the earlier output, or its entry for the same budget)."""
    # Overhead covers this invocation only (a resumed run times the trials it ran); a study that had nothing
    # left to run has no overhead_fraction and its report time counts as overhead.
    own_minutes = sum(s["wall_minutes"] * (1 - s["overhead_fraction"]) for s in (lam, post)
                      if s.get("overhead_fraction") is not None)
    if own_minutes:
        return {"wall_minutes": wall / 60, "overhead_fraction": max(0.0, 1 - own_minutes / (wall / 60)),
                "timed_trials": sum(s.get("timed_trials", 0) for s in (lam, post))}
    if previous:  # nothing left to run: keep the timing of the run that trained
        return {k: previous.get(k) for k in ("wall_minutes", "overhead_fraction", "timed_trials")}
    return {"wall_minutes": wall / 60, "overhead_fraction": None}


def recipe_record(cfg, post_cfg, config_path: str, reference_input: dict | None) -> dict:
    """What both studies ran: the sweep config, its overrides and search space, what drives the structure."""
    return {"sweep_config": config_path, "study": cfg.study, "overrides": cfg.overrides,
            "params": {k: dataclasses.asdict(v) for k, v in cfg.params.items()},
            "structure_driven_by": ("budget target (Lagrangian)" if "compress.budget_target" in cfg.params
                                    else "raw λ penalties"),
            "reference_overrides": cfg.reference_overrides, "reference_input": reference_input,
            "posthoc_params": list(post_cfg.params)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sweeps/ml100k_recipe.yaml")
    ap.add_argument("--tune-tokens", type=_ints, default=[16, 24, 32, 48, 64, 96, 128],
                    help="token budgets the dense reference is validated at")
    ap.add_argument("--tune-history", type=_ints, default=[3, 5, 10], help="history sizes, likewise")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="results/benchmarks/ml100k_pareto.json")
    ap.add_argument("--figure", default="results/figures/ml100k_pareto_front.png")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    training = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    try:
        own = [o for o in args.overrides if "." not in o.partition("=")[0]]
        cfg = load_sweep(args.config, own, training + [o for o in args.overrides if o not in own])
        reference_input = prepare_reference(cfg, args.tune_tokens, args.tune_history)
        both = run_both(cfg, args.workers)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lam, post, post_cfg, cmp = both["lam"], both["post"], both["post_cfg"], both["cmp"]
    pareto, posthoc = front_rows(lam, post)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else None
    timing_ = timing(lam, post, both["wall"], previous)
    recipe = recipe_record(cfg, post_cfg, args.config, reference_input)
    out = {"dataset": "ml-100k", "recipe": recipe, "n_trials": lam["n_trials"], "n_trials_posthoc": post["n_trials"],
           "sampler": cfg.sampler, "objectives": cfg.objectives, "directions": cfg.directions,
           "reference_point": lam["reference_point"], "reference": lam["reference"],
           "normalisation": lam["normalisation"],
           "hypervolume": {"lambda_search": lam["hypervolume"], "posthoc": post["hypervolume"],
                           "ratio": cmp["ratio"] if cmp else None},
           "pareto": pareto, "posthoc": posthoc,
           "excluded": {"lambda_search": lam.get("excluded", []), "posthoc": post.get("excluded", [])},
           **timing_,
           "trial_minutes": {"lambda_search": lam.get("trial_minutes"), "posthoc": post.get("trial_minutes")},
           "training_steps": {"lambda_search": training_steps(cfg), "posthoc": training_steps(post_cfg)},
           }
    write_benchmark(args.out, out)
    figure(lam, post, cfg.objectives, Path(args.figure))
    print(json.dumps(out["hypervolume"]), f"→ {args.out}, {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
