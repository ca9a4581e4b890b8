"""Baselines: closed forms checked against direct computation, tuning on validation, fold-in at test."""
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import HANG_S

from recsys.data.dataset import build_dataset
from recsys.data.split import leave_last_out
from recsys.data.synthetic import generate
from recsys.retrieval.baselines import (
    ease_weights,
    itemknn_weights,
    matrix_scorer,
    popularity_scores,
    run_ease,
    run_itemknn,
    run_popularity,
)


def _x():
    rng = np.random.default_rng(0)
    return sp.csr_matrix((rng.random((30, 8)) < 0.3).astype(float))


def test_dense_weights_score_sparse_history_rows_as_the_dense_product():
    """EASE^R's scorer multiplies the sparse history rows by W (nnz·N work): the scores of the dense product."""
    split = leave_last_out(generate(seed=1, n_users=60, n_items=40))
    w = ease_weights(split.matrix("val"), 10.0)
    assert w.flags["C_CONTIGUOUS"]  # else scipy copies W on every sparse × dense product
    users = np.arange(0, split.n_users, 3)
    for stage in ("val", "test"):
        dense = torch.from_numpy(np.asarray(split.matrix(stage)[users].todense()) @ w)
        assert torch.allclose(matrix_scorer(split, stage, w)(users), dense, atol=1e-10)


def test_ease_matches_the_constrained_least_squares_solution():
    x = _x()
    lam = 3.0
    b = ease_weights(x, lam)
    xd = x.toarray()
    g = xd.T @ xd + lam * np.eye(8)
    p = np.linalg.inv(g)
    expected = np.eye(8) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(b, expected - np.diag(np.diag(expected)), atol=1e-10)
    assert np.allclose(np.diag(b), 0)
    # stationarity of the Lagrangian: (XᵀX + λI) B - XᵀX is zero off the diagonal
    resid = g @ b - xd.T @ xd
    assert np.allclose(resid - np.diag(np.diag(resid)), 0, atol=1e-8)


def test_itemknn_is_cosine_with_topk_per_row():
    x = _x()
    full = itemknn_weights(x, None)
    xd = x.toarray()
    n = np.linalg.norm(xd, axis=0)
    cos = xd.T @ xd / np.outer(n, n)
    np.fill_diagonal(cos, 0)
    np.testing.assert_allclose(full, cos, atol=1e-12)
    top2 = itemknn_weights(x, 2)
    assert ((top2 > 0).sum(1) <= 2).all()
    for r in range(8):
        kept = np.flatnonzero(top2[r])
        assert set(kept) <= set(np.argsort(-cos[r])[:3])  # top-2 (ties may swap with the 3rd)


def test_popularity_counts_training_interactions_only():
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("v", "b", 1), ("v", "a", 2), ("v", "a", 3)]
    ds = build_dataset("toy", rows, {"a": "A", "b": "B", "c": "C"}, "toy")
    split = leave_last_out(ds)  # train: u=[a], v=[b]
    assert popularity_scores(split).tolist() == [1, 1, 0]


def test_collaborative_baselines_beat_popularity_and_pick_by_validation():
    split = leave_last_out(generate(seed=1, n_users=300, n_items=300))
    pop, _ = run_popularity(split, progress=False)
    knn, knn_info = run_itemknn(split, grid=(10, None), progress=False)
    ease, ease_info = run_ease(split, grid=(10.0, 100.0), progress=False)
    assert knn.metrics["ndcg@10"] > pop.metrics["ndcg@10"]
    assert ease.metrics["ndcg@10"] > pop.metrics["ndcg@10"]
    assert knn_info["k"] in (10, "all") and ease_info["lambda"] in (10.0, 100.0)
    assert len(pop.users) == len(split.eval_users)


def test_baselines_scale_benchmark_reports_grid_time_and_memory(tmp_path):
    """experiments/baselines_scale.py at toy size: ItemKNN's whole validation grid and one EASE^R λ are timed, EASE^R's
    cost is stated before it fits, and the JSON carries the peak memory and the machine."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, "experiments/baselines_scale.py", "--users", "600", "--items", "400",
                           "--out", str(out)], cwd=repo, capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["items"] == 400 and res["train_interactions"] > 0
    assert res["itemknn"]["grid_and_test_seconds"] > 0 and res["itemknn"]["chosen_k"] is not None
    assert res["ease"]["stated"].startswith("EASE^R on 400 items") and res["ease"]["runs"][0]["lambda"] == 500.0
    run = res["ease"]["runs"][0]
    assert run["fit_seconds"] > 0 and run["fit_val_test_seconds"] >= run["fit_seconds"] + run["val_scoring_seconds"]
    assert res["ease"]["grid_estimate_seconds"] == pytest.approx(
        res["ease"]["grid_size"] * (run["fit_seconds"] + run["val_scoring_seconds"]))
    assert res["peak_rss_gb"] > 0 and res["hardware"]["cpu_flags"] is not None


def _custom(folder: Path, n_users: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "items.csv").write_text("item_id,text\n" + "".join(f"i{i},item number {i}\n" for i in range(6)))
    (folder / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u + k) % 6},{k}\n" for u in range(n_users) for k in range(4)))
    return folder


def test_custom_datasets_write_results_under_their_own_names(tmp_path, capsys):
    """`recsys baselines --dataset custom --path A`, then `--path B`: two folders (custom-A, custom-B), neither
    replacing the other; data.label names the folder instead; a run prints only the baselines of its own data."""
    from recsys.cli import main
    from recsys.config import load_config
    from recsys.recipes.evaluate import baseline_rows

    results = tmp_path / "results"
    a, b = _custom(tmp_path / "A"), _custom(tmp_path / "B", n_users=6)
    for folder, extra in ((a, []), (b, []), (a, ["data.label=mine"])):
        assert main(["baselines", "--dataset", "custom", "--path", str(folder), "--models", "popularity",
                     f"tracking.results_dir={results}", "tracking.progress_bar=false", *extra]) == 0
    assert sorted(p.name for p in (results / "baselines").iterdir()) == ["custom-A", "custom-B", "mine"]
    users = {p.name: json.loads((p / "baselines.json").read_text())["users_evaluated"]
             for p in (results / "baselines").iterdir()}
    assert users == {"custom-A": 8, "custom-B": 6, "mine": 8}
    cfg = load_config(None, ["data.name=custom", f"data.path={b}", f"tracking.results_dir={results}"])
    assert [r["model"] for r in baseline_rows(cfg)] == ["popularity"]
    other = load_config(None, ["data.name=custom", f"data.path={b}", "data.label=mine",
                               f"tracking.results_dir={results}"])
    assert baseline_rows(other) == []  # "mine" holds A's baselines: not printed beside a run on B


def _baselines_process(tmp_path: Path, models: str, *extra: str):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recsys.cli", "baselines", "--models", models, "data.synthetic_users=60",
           "data.synthetic_items=80", f"tracking.results_dir={tmp_path / 'results'}", "tracking.progress_bar=false",
           # SASRec that trains until it is stopped: it is what the SIGTERM interrupts
           "sasrec.hidden=[8]", "sasrec.dropout=[0.1]", "sasrec.max_len=[5]", "sasrec.epochs=1000000",
           "sasrec.eval_every=1000000", "sasrec.max_minutes=null", *extra]
    return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc) -> None:
    """Until `path` exists (an event, not a duration: the process's own progress); fails if the process ends."""
    import time

    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)


def test_sigterm_keeps_finished_models_and_leaves_no_lock(tmp_path):
    """SIGTERM while SASRec trains, after Popularity and ItemKNN finished: one line says what was kept, no lock is
    left, the partial folder holds only the finished rows; the same command then runs only what is missing."""
    import signal

    from conftest import HANG_S

    base = tmp_path / "results" / "baselines"
    partial = base / "synthetic.partial"
    proc = _baselines_process(tmp_path, "popularity,itemknn,sasrec")
    _wait_for(partial / "row_itemknn.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (said,) = [line for line in err.splitlines() if line.startswith("baselines stopped")]
    assert "SIGTERM" in said and "popularity, itemknn finished" in said and str(partial) in said
    assert sorted(p.name for p in base.iterdir()) == ["synthetic.partial"]  # no lock, no half-made final folder
    assert sorted(p.name for p in partial.iterdir()) == ["baselines_state.json", "per_user_itemknn.csv",
                                                         "per_user_popularity.csv", "row_itemknn.json",
                                                         "row_popularity.json"]
    kept = json.loads((partial / "row_itemknn.json").read_text())
    again = _baselines_process(tmp_path, "popularity,itemknn")
    out, err = again.communicate(timeout=HANG_S)
    assert again.returncode == 0, err
    assert "popularity: finished in an earlier run" in out and "itemknn: finished in an earlier run" in out
    assert sorted(p.name for p in base.iterdir()) == ["synthetic"]
    res = json.loads((base / "synthetic" / "baselines.json").read_text())
    assert list(res["models"]) == ["popularity", "itemknn"] and res["models"]["itemknn"] == kept
    assert not list((base / "synthetic").glob("row_*.json"))


def test_sigterm_before_any_model_finished_leaves_nothing(tmp_path):
    import signal

    from conftest import HANG_S

    base = tmp_path / "results" / "baselines"
    proc = _baselines_process(tmp_path, "sasrec")
    _wait_for(base / "synthetic.partial" / "baselines_state.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert list(base.iterdir()) == []


def test_every_grid_is_settable_from_the_command_line(tmp_path, capsys):
    """baselines.ease_lambdas and baselines.itemknn_k replace the grids (a one-value λ grid: one EASE^R fit)."""
    from recsys.cli import main

    results = tmp_path / "results"
    assert main(["baselines", "--models", "itemknn,ease", "data.synthetic_users=60", "data.synthetic_items=80",
                 "baselines.ease_lambdas=[7.5]", "baselines.itemknn_k=[3]", f"tracking.results_dir={results}",
                 "tracking.progress_bar=false"]) == 0
    res = json.loads((results / "baselines" / "synthetic" / "baselines.json").read_text())["models"]
    assert res["ease"]["lambda"] == 7.5 and res["itemknn"]["k"] == 3
    assert main(["baselines", "--models", "ease", "baselines.ease_lambdas=[]",
                 f"tracking.results_dir={results}"]) == 2
    assert "ease_lambdas / itemknn_k: a grid needs at least one value" in capsys.readouterr().err
