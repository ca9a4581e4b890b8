"""The schemas of the benchmark JSON files under results/benchmarks/: the keys each file and each of its rows
must have. The benchmark scripts (experiments/) write them, the notebooks check what they read with `check`, and
tests check the committed files and the notebooks' fixtures against the same definitions."""
from __future__ import annotations

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
}


def problems(name: str, data: dict) -> list[str]:
    """What `data` (the contents of results/benchmarks/<name>) lacks of its schema; [] when it conforms."""
    keys, rows = SCHEMAS[name]
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
