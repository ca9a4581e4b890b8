"""The schemas of the benchmark JSON files under results/benchmarks/: the keys each file and each of its rows
must have. The benchmark scripts (experiments/) write them, the notebooks check what they read with `check`, and
tests check the committed files and the notebooks' fixtures against the same definitions."""
from __future__ import annotations

from fnmatch import fnmatch

# file name → (top-level keys, (the list of rows, the keys of every row)); a file may hold more than this
SCHEMAS: dict[str, tuple[list[str], tuple[str, list[str]] | None]] = {
    "ml100k_lambda.json": (["runs"],
                           ("runs", ["name", "ndcg@10", "measured_ms_median", "predicted_ms", "asymmetric", "budget",
                                     "lambda_params", "lambda_flops", "lambda_latency"])),
    "ml100k_pareto.json": (["hypervolume", "reference", "reference_point", "pareto", "posthoc"],
                           ("pareto", ["trial", "val", "test", "measured_ms_median"])),
    "ml100k_compression.json": (["rows", "best_fp32_ms", "distill_vs_nodistill", "hardware"],
                                ("rows", ["name", "precision", "seeds", "ndcg@10", "ndcg_vs_dense", "ndcg@10_std",
                                          "recall@10", "measured_ms_median", "speedup", "speedup_vs_best_fp32"])),
    "ml100k_structure.json": (["dense", "best", "runs", "selection", "hardware"],
                              ("runs", ["kind", "seed", "test", "measured_ms_median", "user_max_tokens",
                                        "history_items"])),
    "recipe_throughput.json": (["variants", "hardware"], None),
    # issue 19: data-parallel training on the CPU (experiments/ddp_scaling.py) and the one-GPU check (gpu_check.py)
    "ddp_scaling.json": (["rows", "deepspeed", "hardware"],
                         ("rows", ["processes", "gather_negatives", "examples_per_s"])),
    "gpu_check.json": (["device", "train_bf16", "deepspeed_zero2", "full_ranking", "item_encoding", "faiss_gpu",
                        "hardware"], None),
    "retrieval_scale.json": (["catalogs", "bar", "generator_check", "blas", "peak_rss_mb", "hardware"],
                             ("catalogs", ["n_items", "exact", "indexes"])),
    # issue 17: user-tower families (experiments/user_towers.py); the same schema on ML-100K and the ML-1M subset
    **{f"{d}_user_towers.json": (["rows", "dataset", "aim"],
                                 ("rows", ["name", "ndcg@10", "recall@10", "n_seeds", "train_minutes",
                                           "measured_ms_median"])) for d in ("ml100k", "ml1m")},
    # issue 24: model families, warm and cold start (experiments/families.py; `--out` names variants such as
    # ml100k_families_hidden.json, one file per process)
    "*_families*.json": (["rows", "dataset", "protocols", "hardware"],
                         ("rows", ["name", "split", "ndcg@10", "recall@10", "n_seeds"])),
    # issue 28: recsys serve under open-loop load (experiments/serve_load.py)
    "serve_load.json": (["slo_ms", "capacity_per_s", "unloaded", "dense", "fast", "front", "servers", "bar",
                         "hardware"],
                        ("rows", ["server", "rate_x", "offered_per_s", "achieved_per_s", "p50_ms", "p95_ms", "p99_ms",
                                  "over_slo_share", "effective_ndcg@10", "model_share"])),
}


def schema_of(name: str) -> tuple[list[str], tuple[str, list[str]] | None] | None:
    """The schema of results/benchmarks/<name>: its own entry, else the first pattern it matches; None: none."""
    if name in SCHEMAS:
        return SCHEMAS[name]
    return next((v for k, v in SCHEMAS.items() if "*" in k and fnmatch(name, k)), None)


def problems(name: str, data: dict) -> list[str]:
    """What `data` (the contents of results/benchmarks/<name>) lacks of its schema; [] when it conforms."""
    schema = schema_of(name)
    if schema is None:
        return [f"{name}: no schema for this file name"]
    keys, rows = schema
    out = [f"{name}: no key {k!r}" for k in keys if k not in data]
    if rows is not None and isinstance(data.get(rows[0]), list):
        for i, row in enumerate(data[rows[0]]):
            out += [f"{name}: {rows[0]}[{i}] has no key {k!r}" for k in rows[1] if k not in row]
    return out


def check(name: str, data: dict) -> dict:
    """`data` if it conforms to the schema of `name`, else ValueError naming the first missing key."""
    found = problems(name, data)
    if found:
        raise ValueError(found[0])
    return data
