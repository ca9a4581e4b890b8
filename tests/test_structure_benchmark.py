"""experiments/ml100k_pareto.py (the combined-loss recipe against post-hoc pruning) then
experiments/ml100k_structure.py, end to end on a tiny BERT and synthetic data: the dense reference's input
length is chosen on validation, both studies run and search the same input knobs, the structure benchmark picks
a trial on validation, retrains it and writes the issue's schema — so the hours-long benchmark cannot fail at its
last step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import HANG_S, tiny_run_args

from recsys.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pareto_then_structure_benchmark_end_to_end(tmp_path, tiny_model):
    args = [*tiny_run_args(tiny_model, tmp_path), "data.name=synthetic", "train.epochs=1"]
    assert main(["train", "--config", "configs/ml100k.yaml", *args, "tracking.run_name=dense"]) == 0
    dense = tmp_path / "results" / "runs" / "dense"
    recipe = yaml.safe_load((REPO / "configs/sweeps/ml100k_recipe.yaml").read_text())
    # max_reference_drift off: a tiny BERT's sub-ms requests on a busy machine can be 50× off (tests/test_sweep.py)
    sweep = {**recipe, "study": "tiny", "n_trials": 2, "results_dir": str(tmp_path / "results"),
             "max_reference_drift": 1e9, "reference_run": str(dense),
             "overrides": [o.replace("results/runs/ml-100k-bench-seed0", str(dense)) for o in recipe["overrides"]]
             + [*args, "compress.ffn_group=8", "train.examples_per_user=1"],
             "params": {**recipe["params"], "data.user_max_tokens": {"type": "categorical", "choices": [16, 32]},
                        "data.history_items": {"type": "categorical", "choices": [2, 3]}}}
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    pareto = subprocess.run([sys.executable, "experiments/ml100k_pareto.py", "--config", str(cfg), "--tune-tokens",
                             "16,32", "--tune-history", "2,3", "--out", str(tmp_path / "pareto.json"), "--figure",
                             str(tmp_path / "front.png")], cwd=REPO, capture_output=True, text=True, timeout=HANG_S,
                            env=env)
    assert pareto.returncode == 0, pareto.stderr[-3000:]
    res = json.loads((tmp_path / "pareto.json").read_text())
    recipe_out = res["recipe"]
    assert recipe_out["structure_driven_by"] == "budget target (Lagrangian)"
    grid = recipe_out["reference_input"]["grid_val"]
    assert len(grid) == 4 and recipe_out["reference_input"]["chosen"]["ndcg@10"] == max(r["ndcg@10"] for r in grid)
    cached = json.loads((tmp_path / "results" / "sweeps" / f"reference-input-{dense.name}.json").read_text())
    assert cached["grid"] == grid and cached["hardware"]["cpu_flags"] is not None  # the machine, in the file
    assert set(recipe_out["posthoc_params"]) == {"compress.prune_ratio", "data.user_max_tokens", "data.history_items"}
    assert res["n_trials"] == res["n_trials_posthoc"] == 2
    steps = res["training_steps"]
    assert steps["lambda_search"]["per_trial_mean"] == steps["posthoc"]["per_trial_mean"]  # equal compute
    assert (tmp_path / "front.png").is_file()
    # carried to a fresh machine: the saved state alone (no checkpoints) resumes both studies and their report
    state = tmp_path / "state"
    for action in ("save", "restore"):
        if action == "restore":
            import shutil
            shutil.rmtree(tmp_path / "results" / "sweeps")
        done = subprocess.run([sys.executable, "experiments/study_state.py", action, "--config", str(cfg), "--state",
                               str(state)], cwd=REPO, capture_output=True, text=True, timeout=HANG_S, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert not list((tmp_path / "results" / "sweeps").rglob("*.ckpt"))
    again = subprocess.run([sys.executable, "experiments/ml100k_pareto.py", "--config", str(cfg), "--out",
                            str(tmp_path / "again.json"), "--figure", str(tmp_path / "again.png")], cwd=REPO,
                           capture_output=True, text=True, timeout=HANG_S, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((tmp_path / "again.json").read_text())
    assert resumed["hypervolume"] == res["hypervolume"] and resumed["pareto"] == res["pareto"]
    structure = subprocess.run([sys.executable, "experiments/ml100k_structure.py", "--config", str(cfg), "--seeds",
                                "0", "--share", "0", "--out", str(tmp_path / "structure.json")], cwd=REPO,
                               capture_output=True, text=True, timeout=HANG_S, env=env)
    assert structure.returncode == 0, structure.stderr[-3000:]
    out = json.loads((tmp_path / "structure.json").read_text())
    assert {"ndcg@10", "measured_ms_median"} <= set(out["dense"])
    assert {"ndcg@10", "speedup", "n_seeds", "shape", "user_max_tokens", "history_items"} <= set(out["best"])
    assert out["best"]["speedup"] == out["dense"]["measured_ms_median"] / out["best"]["measured_ms_median"]
    assert [r["kind"] for r in out["runs"]] == ["best", "dense"]
    assert out["selection"]["stage"] == "val" and out["hardware"]["cpu_flags"] is not None
    # a share no trial reaches: nothing is retrained; the JSON says so, with the closest trials of both studies
    none = subprocess.run([sys.executable, "experiments/ml100k_structure.py", "--config", str(cfg), "--share", "100",
                           "--out", str(tmp_path / "missed.json")], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_S, env=env)
    assert none.returncode == 0, none.stderr[-3000:]
    miss = json.loads((tmp_path / "missed.json").read_text())
    assert miss["best"] is None and miss["runs"] == [] and "reaches 10000%" in miss["missed"]
    assert miss["selection"]["candidates"] == 0 and len(miss["selection"]["closest"]) == 2
    assert miss["posthoc_selection"]["completed"] == 2 and "ndcg@10" in miss["dense"]
