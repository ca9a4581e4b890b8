"""Indexes measured on the queries that arrive (issue 26): recall against exact on a run's user vectors, an index
tuned to a recall target on validation users (recorded with the run), an IVF whose probe vectors are fitted to
user queries; and cached indexes that are truncated, corrupt or of another dimension (issue 25, item 7)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_index import clustered

from recsys.cli import main
from recsys.config import index_spec, parse_index_spec
from recsys.errors import RecsysError

faiss = pytest.importorskip("faiss")


def user_like(n: int, items: np.ndarray, seed: int) -> np.ndarray:
    """Queries not distributed like the items: the mean of 8 random items, pushed along one shared direction."""
    rng = np.random.default_rng(seed)
    x = items[rng.integers(0, len(items), (n, 8))].mean(1)
    off = np.random.default_rng(99).standard_normal(items.shape[1])
    x = x + 1.5 * off / np.linalg.norm(off) + 0.3 * rng.standard_normal(x.shape) / np.sqrt(items.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the spec keys ------------------------------------------------------------------------------------------------


def test_recall_and_probe_are_spec_keys():
    cfg = parse_index_spec("ivf,nlist=64,recall=0.95,probe=queries")
    assert (cfg.recall, cfg.probe) == (0.95, "queries") and parse_index_spec(index_spec(cfg)) == cfg
    assert index_spec(parse_index_spec("ivf,nlist=64,nprobe=8")) == "ivf,nlist=64,nprobe=8,k=100"  # defaults unsaid
    assert parse_index_spec("hnsw,M=16,recall=0.9").recall == 0.9


# --- tuning to a recall target ------------------------------------------------------------------------------------


def test_tuning_picks_the_smallest_nprobe_reaching_the_target():
    from recsys.retrieval.index import build_index, exact_topk, recall_at, set_search_params
    from recsys.retrieval.index_tuning import tune_index
    x = clustered(4000)
    q = torch.from_numpy(user_like(300, x, seed=1))
    keys = torch.from_numpy(x)
    built = build_index(x, parse_index_spec("ivf,nlist=32,recall=0.9,k=10"))
    tuned, t = tune_index(built, q, keys)
    truth = exact_topk(q, keys, 10).numpy()

    def recall(p):
        return recall_at(set_search_params(built, parse_index_spec(f"ivf,nlist=32,nprobe={p},k=10")).search(q, 10)[1],
                         truth, 10)
    assert t.param == "nprobe" and 1 < t.value < 32 and tuned.cfg.nprobe == t.value
    assert recall(t.value) == pytest.approx(t.recall) and t.recall >= 0.9 > recall(t.value - 1)  # the smallest
    assert tuned.spec == f"ivf,nlist=32,nprobe={t.value},recall=0.9,k=10" and t.n_queries == 300
    assert [v for v, _ in t.curve][:2] == [1, 2]  # doubling from the smallest value, then bisection
    _, strict = tune_index(built, q, keys, target=0.99)
    assert strict.value > t.value  # a higher target needs more lists


def test_tuning_hnsw_and_an_unreachable_target():
    from recsys.retrieval.index import build_index
    from recsys.retrieval.index_tuning import tune_index
    x = clustered(3000)
    q = torch.from_numpy(user_like(200, x, seed=1))
    hnsw, t = tune_index(build_index(x, parse_index_spec("hnsw,M=8,efConstruction=40,k=10")), q,
                         torch.from_numpy(x), target=0.95)
    assert t.param == "ef_search" and t.value >= 10 and t.recall >= 0.95 and hnsw.cfg.ef_search == t.value
    coarse = build_index(x, parse_index_spec("ivfpq,nlist=16,m=4,nbits=4,k=10"))  # 4 × 4-bit codes: lossy
    with pytest.raises(RecsysError) as e:
        tune_index(coarse, q, torch.from_numpy(x), target=0.999)
    msg = str(e.value)
    assert "retrieval.recall=0.999" in msg and "reaches at most recall@10" in msg and "nprobe=" in msg
    assert "\n" not in msg


# --- an IVF that knows its queries ------------------------------------------------------------------------------------


def test_probe_vectors_fitted_to_user_queries_find_more_neighbours(tmp_path):
    from recsys.retrieval.index import build_index, cached_index, exact_topk, recall_at, set_search_params
    from recsys.retrieval.query_aware import list_of_items
    x = clustered(4000)
    fit, held_out = user_like(600, x, seed=1), user_like(300, x, seed=2)  # fitted on some users, measured on others
    truth = exact_topk(torch.from_numpy(held_out), torch.from_numpy(x), 10).numpy()
    plain = build_index(x, parse_index_spec("ivf,nlist=32,nprobe=2,k=10"))
    aware = build_index(x, parse_index_spec("ivf,nlist=32,nprobe=2,probe=queries,k=10"), queries=fit)
    # the items stay in the lists k-means gave them: only which lists a query probes changes
    assert np.array_equal(list_of_items(faiss.extract_index_ivf(plain.index), 4000),
                          list_of_items(faiss.extract_index_ivf(aware.index), 4000))
    for p in (1, 2, 4):
        r = [recall_at(set_search_params(ix, parse_index_spec(f"ivf,nlist=32,nprobe={p},probe={kind},k=10"))
                       .search(held_out, 10)[1], truth, 10) for ix, kind in ((plain, "centroids"), (aware, "queries"))]
        assert r[1] > r[0] + 0.02, (p, r)
    scores, ids = aware.search(held_out[:5], 10)  # IVF-Flat scores raw vectors: the probe vectors change no score
    assert np.allclose(scores, np.einsum("qd,qkd->qk", held_out[:5], x[ids]), atol=1e-5)
    with pytest.raises(RecsysError, match="probe=queries.*needs sampled user queries"):
        build_index(x, parse_index_spec("ivf,nlist=32,probe=queries"))
    saved = cached_index(tmp_path, torch.from_numpy(x), aware.cfg, "f", queries=fit)
    again = cached_index(tmp_path, torch.from_numpy(x), aware.cfg, "f")  # loaded: the probe vectors kept
    assert (tmp_path / "ivf-nlist=32-probe=queries" / "index.faiss").is_file()
    assert np.array_equal(again.search(held_out, 10)[1], saved.search(held_out, 10)[1])


# --- a trained run: evaluation, tuning recorded with the run, the index term, the sweep -------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    from conftest import tiny_run_args, train_run
    root = tmp_path_factory.mktemp("index_queries_run")
    return train_run(tiny_run_args(tiny_model, root), root, "r")


def test_evaluate_tunes_on_validation_users_and_records_it(run, capsys, monkeypatch):
    assert main(["evaluate", str(run), "--index", "ivf,nlist=8,recall=0.9"]) == 0
    out = capsys.readouterr().out
    assert "test user queries: ann recall@10" in out and "tuned on" in out and "validation users: nprobe=" in out
    record = json.loads((run / "index_tuning.json").read_text())["ivf-nlist=8-recall=0.9"]
    assert record["queries"] == "validation users" and record["recall"] >= 0.9 and record["target"] == 0.9
    assert f"nprobe={record['value']}," in record["spec"] and record["n_queries"] == 120
    cache = run.parent.parent / "cache" / "index" / "r"
    assert list(cache.glob("users-val-*.pt")) and list(cache.glob("users-test-*.pt"))
    # a second evaluation reads the recorded choice (no tuning) and reports on test the same setting
    import recsys.recipes.retrieval_index as ri
    monkeypatch.setattr(ri, "tune_index", lambda *a, **k: pytest.fail("tuned again"))
    from recsys.recipes.retrieval_index import evaluate_run_index
    res = evaluate_run_index(run, "ivf,nlist=8,recall=0.9", "test", progress=False)
    assert res.tuning["value"] == record["value"] and res.index.stage == "test"
    assert 0.0 <= res.ann_recall <= 1.0 and res.summary()["queries"] == "test users"


def test_online_cost_quotes_the_index_with_its_recall_on_user_queries(run):
    from recsys.recipes.retrieval_index import online_request_index
    _, tuned = online_request_index(run, "ivf,nlist=8,recall=0.9,k=10")
    term = tuned["index_term"]
    assert term["recall_queries"] == "validation users" and term["recall@10"] >= 0.9 and term["tuning"]
    assert term["spec"] == tuned["spec"] and f"nprobe={term['tuning']['value']}," in term["spec"]
    _, one = online_request_index(run, "ivf,nlist=8,nprobe=1,k=10")
    _, all_lists = online_request_index(run, "ivf,nlist=8,nprobe=8,k=10")
    assert all_lists["index_term"]["recall@10"] == 1.0  # every list probed: exact
    assert one["index_term"]["madds"] < all_lists["index_term"]["madds"]
    assert one["index_term"]["recall@10"] <= all_lists["index_term"]["recall@10"]


def test_a_query_aware_index_of_a_run_through_the_cli(run, capsys):
    assert main(["evaluate", str(run), "--stage", "val", "--index", "ivf,nlist=8,nprobe=8,probe=queries"]) == 0
    out = capsys.readouterr().out
    assert "(ivf,nlist=8,nprobe=8,probe=queries,k=100)" in out and "ann recall@10 1.0000" in out
    cache = run.parent.parent / "cache" / "index" / "r"
    assert (cache / "ivf-nlist=8-probe=queries" / "index.faiss").is_file()


# --- cached indexes that cannot be used as they are (issue 25, item 7) --------------------------------------------


def _corrupt(folder, how):
    if how == "truncated":
        data = (folder / "index.faiss").read_bytes()
        (folder / "index.faiss").write_bytes(data[: len(data) // 2])
    elif how == "metadata":
        (folder / "meta.json").write_text('{"config": {"index": "ivf", ')
    else:  # an index of another dimension, under this catalog's metadata
        other = faiss.IndexFlatIP(7)
        other.add(np.zeros((3, 7), dtype=np.float32))
        faiss.write_index(other, str(folder / "index.faiss"))


@pytest.mark.parametrize("how, says", [("truncated", "truncated or corrupt"), ("metadata", "corrupt metadata"),
                                       ("dimension", "holds 3 × 7 vectors, its metadata says 150 × 32")])
def test_a_broken_cached_index_is_rebuilt_saying_so(run, tmp_path, how, says, capsys):
    import shutil
    mine = tmp_path / "results" / "runs" / "r"
    shutil.copytree(run, mine)
    assert main(["evaluate", str(mine), "--index", "ivf,nlist=4,nprobe=4"]) == 0
    folder = tmp_path / "results" / "cache" / "index" / "r" / "ivf-nlist=4"
    _corrupt(folder, how)
    capsys.readouterr()
    assert main(["evaluate", str(mine), "--index", "ivf,nlist=4,nprobe=4"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and says in warning[0] and warning[0].endswith("rebuilding it")
    assert "Traceback" not in captured.err and "recall@10 1.0000" in captured.out
    assert faiss.read_index(str(folder / "index.faiss")).ntotal == 150  # rebuilt in place
    assert main(["evaluate", str(mine), "--index", "ivf,nlist=4,nprobe=4"]) == 0
    assert "warning" not in capsys.readouterr().err  # and used as it is from then on


def test_queries_of_another_dimension_are_one_line():
    from recsys.retrieval.index import build_index
    index = build_index(clustered(500), parse_index_spec("ivf,nlist=8,nprobe=2,k=10"))
    with pytest.raises(RecsysError) as e:
        index.search(np.zeros((2, 16), dtype=np.float32), 10)
    assert "queries of shape (2, 16) for an index over 32-d items" in str(e.value) and "\n" not in str(e.value)


# --- the sweep's index dimension at a recall target ------------------------------------------------------------------


def test_a_sweep_tunes_each_trial_to_the_recall_target(tmp_path, tiny_model, capsys):
    """retrieval.recall in a sweep: every trial's nprobe is tuned on its own validation users, recorded with the
    trial and its run, and the index dimension (nlist) is compared at equal recall."""
    import optuna
    from optuna.storages.journal import JournalFileBackend
    from test_sweep import read_csv, write_sweep

    base = ["retrieval.index=ivf", "retrieval.recall=0.9", "retrieval.k=20"]
    bad = write_sweep(tmp_path, tiny_model, overrides=base, n_trials=1,
                      params={"retrieval.nprobe": "{type: categorical, choices: [1, 8]}"})
    assert main(["sweep", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "retrieval.nprobe with retrieval.recall=0.9" in err and "\n" not in err and "Traceback" not in err
    cfg = write_sweep(tmp_path, tiny_model, objectives="[ndcg@10, flops]", n_trials=2, overrides=base,
                      params={"retrieval.nlist": "{type: categorical, choices: [4, 8]}"})
    assert main(["sweep", "--config", str(cfg)]) == 0
    folder = tmp_path / "results" / "sweeps" / "test"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    trials = optuna.load_study(study_name="test", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials:
        index = t.user_attrs["index"]
        tuned = index["tuned"]
        assert tuned["param"] == "nprobe" and tuned["target"] == 0.9 and tuned["recall"] >= 0.9
        assert f"nlist={t.params['retrieval.nlist']},nprobe={tuned['value']}," in index["spec"]
        assert index["queries"] == "validation users" and index["ann_recall@10"] == pytest.approx(tuned["recall"])
        record = json.loads((Path(t.user_attrs["run_dir"]) / "index_tuning.json").read_text())
        assert record[f"ivf-nlist={t.params['retrieval.nlist']}-recall=0.9"]["value"] == tuned["value"]
    assert read_csv(folder / "pareto.csv")


# --- experiments/retrieval_scale.py on user queries, end to end at a tiny size ----------------------------------------


@pytest.mark.slow
def test_retrieval_scale_measures_user_queries(run, tmp_path, monkeypatch):
    """The benchmark in a trained run's space: every index's recall on test user queries with item queries beside,
    the tuned indexes and the query-aware IVF at the target, the generator checks, NDCG through tuned indexes."""
    import sys

    from conftest import REPO, SHARED_DATA

    from recsys.tracking.schemas import problems
    if not (SHARED_DATA / "ml-100k" / "u.item").is_file():
        pytest.skip("ML-100K not available")
    sys.path.insert(0, str(REPO / "experiments"))
    import retrieval_scale as rs
    monkeypatch.chdir(tmp_path)  # its cache is results/cache/retrieval_scale/ under the working directory
    monkeypatch.setattr(rs, "REAL_SOURCES", (("ml-100k", "ml-100k"),))
    monkeypatch.setattr(rs, "N_ROUTER", 400)
    out = tmp_path / "rs.json"
    assert rs.main(["--runs", str(run), "--sizes", "3000", "--rounds", "1", "--target", "0.9", "--threads", "1",
                    "--data-dir", str(SHARED_DATA), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert problems("retrieval_scale.json", data) == [] and data["headline_space"] == str(run)
    (space,) = data["spaces"]
    assert space["kind"] == "text" and set(space["generator_check"]) == {"real", "generated", "generated_users"}
    (cat,) = space["catalogs"]
    assert cat["n_items"] == 3000 and cat["n_queries"] == 1000
    assert cat["n_real_user_queries"] == min(500, space["generator"]["real_test_users"]) > 0
    for e in cat["indexes"]:
        assert 0 <= e["recall@10"] <= 1 and 0 <= e["recall@10_item_queries"] <= 1 and e["queries"] == "test users"
    tuned = [e for e in cat["indexes"] if "tuned" in e]
    assert {e["spec"].split(",")[0] for e in tuned} == {"ivf", "hnsw"} and len(tuned) == 3
    assert all(e["tuned"]["recall"] >= 0.9 and e["tuned"]["queries"] == "validation user queries" for e in tuned)
    assert set(cat["at_equal_recall"]) == {"target", "ivf", "ivf_probe_queries", "hnsw"}
    full = [e for e in cat["indexes"] if e["spec"].startswith("flat")]
    assert full[0]["recall@10"] == pytest.approx(1.0, abs=0.01)  # distinct texts: (almost) no ties left
    ndcg = {r["spec"]: r for r in space["ndcg"]["indexes"]}
    assert any("recall=0.9" in s and "probe=queries" in s for s in ndcg)
    assert all(r["tuned"]["recall"] >= 0.9 for r in ndcg.values() if "tuned" in r)


def test_query_gap_row_of_a_run(run):
    """experiments/query_gap.py's measurement of one trained run: the gap, recall at equal nprobe, tuned nprobe."""
    import sys

    from conftest import REPO
    sys.path.insert(0, str(REPO / "experiments"))
    import query_gap
    row = query_gap.measure(run, 0.9)
    assert -1 <= row["user_to_item_median_best_cosine"] <= 1 and row["nlist"] == 4
    curve = [row["ivf_recall@10_test_users"][p] for p in ("1", "2", "4")]
    assert curve == sorted(curve) and curve[-1] == 1.0  # nprobe = nlist: exact
    for name in ("ivf_tuned", "ivf_probe_queries_tuned"):
        assert row[name]["val_recall@10"] >= 0.9 and 1 <= row[name]["nprobe"] <= 4
