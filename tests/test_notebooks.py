"""The paper-figure notebooks run end to end (nbclient, a real kernel) on small results fixtures with the
benchmarks' schema, and write their figures."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import HANG_S

from recsys.tracking.schemas import SCHEMAS, problems, schema_of

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def _lambda_runs() -> dict:
    def run(name, ndcg, ms, **kw):
        return {"name": name, "ndcg@10": ndcg, "measured_ms_median": ms, "predicted_ms": 0.9 * ms, "params": 1e6,
                "asymmetric": False, "budget": None, "lambda_params": 0, "lambda_flops": 0, "lambda_latency": 0,
                **kw}
    return {"runs": [run("dense", 0.07, 30.0), run("flops-2", 0.068, 20.0, lambda_flops=2.0),
                     run("budget", 0.04, 10.0, budget={"metric": "latency", "target": 0.2}),
                     run("asym", 0.05, 6.0, asymmetric=True, budget={"metric": "latency", "target": 0.2})]}


def _pareto() -> dict:
    def point(trial, ms, ndcg):
        return {"trial": trial, "measured_ms_median": ms, "val": {"ndcg@10": ndcg}, "test": {"ndcg@10": ndcg * 0.9}}
    return {"hypervolume": {"lambda_search": 0.4, "posthoc": 0.5, "ratio": 0.8}, "reference_point": [1.0, 1.0],
            "reference": {"ndcg@10": 0.09, "latency": 37.0},
            "pareto": [point(0, 35.0, 0.08), point(3, 3.0, 0.02)], "posthoc": [point(1, 20.0, 0.06)]}


def _compression() -> dict:
    def row(name, precision, ndcg, ms, seeds=(0, 1, 2)):
        per_seed = [ndcg * (1 + 0.02 * (s - 1)) for s in seeds]
        return {"name": name, "precision": precision, "seeds": list(seeds), "ndcg@10": ndcg,
                "ndcg@10_std": 0.02 * ndcg, "recall@10": 2 * ndcg, "per_seed_ndcg@10": per_seed,
                "measured_ms_median": ms, "speedup": 30.0 / ms, "speedup_vs_best_fp32": 25.0 / ms,
                "ndcg_vs_dense": ndcg / 0.08}
    test = {"diff": 0.003, "ci_low": 0.001, "ci_high": 0.005, "p_ttest": 0.01}
    return {"best_fp32_ms": 25.0, "hardware": "fixture", "distill_vs_nodistill": {"pooled_over_seeds": test},
            "rows": [row("dense_fp32", "fp32", 0.08, 30.0), row("qat_int8", "int8", 0.079, 20.0),
                     row("student_nodistill", "fp32", 0.06, 15.0), row("student_distill", "fp32", 0.063, 15.0),
                     row("stacked", "int8", 0.05, 5.0, seeds=(0,))]}


@pytest.mark.parametrize("notebook, data_file, data, figure, shown", [
    ("structure_frontier.ipynb", "ml100k_lambda.json", _lambda_runs(), "ml100k_structure_frontier.png",
     lambda data: [r["name"] for r in data["runs"]]),
    ("pareto_fronts.ipynb", "ml100k_pareto.json", _pareto(), "ml100k_pareto_test.png",
     lambda data: [str(p["trial"]) for p in data["pareto"]]),
    ("compression.ipynb", "ml100k_compression.json", _compression(), "ml100k_compression.png",
     lambda data: [r["name"] for r in data["rows"]]),
])
def test_notebook_draws_its_figure_from_results(tmp_path, notebook, data_file, data, figure, shown):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / data_file).write_text(json.dumps(data))
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    nbclient.NotebookClient(nb, timeout=HANG_S, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(
        env={**os.environ, "RECSYS_RESULTS": str(tmp_path)})
    png = tmp_path / "figures" / figure
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    tables = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "text/html" in o.get("data", {})]
    assert tables, "the notebook shows its table"
    assert all(n in tables[0]["data"]["text/html"] for n in shown(data))


def test_notebook_without_its_input_fails(tmp_path):
    nb = nbformat.read(NOTEBOOKS / "pareto_fronts.ipynb", as_version=4)
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="ml100k_pareto.json"):
        nbclient.NotebookClient(nb, timeout=HANG_S, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(
            env={**os.environ, "RECSYS_RESULTS": str(tmp_path)})


def test_notebook_refuses_a_file_that_breaks_its_schema(tmp_path):
    """The notebooks check what they read against recsys.tracking.schemas (one line naming the missing key)."""
    bad = _pareto()
    del bad["pareto"][0]["test"]
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "ml100k_pareto.json").write_text(json.dumps(bad))
    nb = nbformat.read(NOTEBOOKS / "pareto_fronts.ipynb", as_version=4)
    with pytest.raises(nbclient.exceptions.CellExecutionError, match=r"pareto\[0\] has no key 'test'"):
        nbclient.NotebookClient(nb, timeout=HANG_S, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(
            env={**os.environ, "RECSYS_RESULTS": str(tmp_path)})


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_benchmarks_and_fixtures_follow_their_schema(name):
    # a pattern (`*_families*.json`) checks every committed file it matches
    for path in sorted((REPO / "results" / "benchmarks").glob(name)):
        assert problems(path.name, json.loads(path.read_text())) == []
    fixtures = {"ml100k_lambda.json": _lambda_runs, "ml100k_pareto.json": _pareto,
                "ml100k_compression.json": _compression}
    if name in fixtures:
        assert problems(name, fixtures[name]()) == []
    assert problems(name, {}) != []  # the schema asks for something


def test_a_schema_pattern_covers_every_variant_a_benchmark_writes():
    families = SCHEMAS["*_families*.json"]
    assert all(schema_of(n) is families for n in ("mind_families.json", "ml100k_families_hidden.json"))
    assert schema_of("ml100k_pareto.json") is SCHEMAS["ml100k_pareto.json"]  # an exact name first
    assert schema_of("ml100k_baselines.json") is None
    assert problems("ml100k_baselines.json", {"rows": []}) == ["ml100k_baselines.json: no schema for this file name"]
    assert problems("mind_families_grid.json", {"dataset": "mind"}) == [
        "mind_families_grid.json: no key 'rows'", "mind_families_grid.json: no key 'protocols'",
        "mind_families_grid.json: no key 'hardware'"]
