"""Retrieval indexes (recsys/retrieval/index.py): specs as config, real faiss indexes, evaluation through an index,
the cached index of a run, the online request and the index cost model; sparse ItemKNN and EASE^R's limit."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recsys.cli import main
from recsys.config import index_spec, load_config, parse_index_spec
from recsys.errors import RecsysError

faiss = pytest.importorskip("faiss")


def clustered(n: int, d: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- specs as typed config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["exact", "flat", "sq8", "fp16,k=20", "ivf,nlist=64,nprobe=8",
                                  "ivfpq,nlist=32,m=8,nbits=6,refine=4", "hnsw,M=16,efConstruction=40,efSearch=128"])
def test_spec_round_trips(spec):
    cfg = parse_index_spec(spec)
    assert parse_index_spec(index_spec(cfg)) == cfg and cfg.index == spec.split(",")[0]


def test_index_settings_are_config_keys_and_overrides():
    cfg = load_config(None, ["retrieval.index=hnsw", "retrieval.ef_search=200", "retrieval.hnsw_m=8"])
    assert (cfg.retrieval.index, cfg.retrieval.ef_search, cfg.retrieval.hnsw_m) == ("hnsw", 200, 8)
    with pytest.raises(RecsysError, match="retrieval.ef_search.*must be >= k"):
        load_config(None, ["retrieval.index=hnsw", "retrieval.ef_search=50", "retrieval.k=100"])
    with pytest.raises(RecsysError, match="retrieval.index must be one of"):
        load_config(None, ["retrieval.index=annoy"])


@pytest.mark.parametrize("spec, message", [
    ("hnws", "unknown index 'hnws' (did you mean 'hnsw'?)"),
    ("hnsw,efSearch=50", "ef_search (50) must be >= k (100)"),
    ("ivf,nlist=8,nprobe=16", "nprobe (16) must be <= nlist (8)"),
    ("ivf,M=4", "'M=4' is not a setting of ivf"),
    ("flat,device=tpu", "device must be one of cpu, gpu"),
    ("ivf,recall=1.5", "recall must be in [0, 1], got 1.5"),
    ("flat,recall=0.9", "'recall=0.9' is not a setting of flat"),
    ("hnsw,probe=queries", "'probe=queries' is not a setting of hnsw"),
    ("ivf,probe=users", "probe must be one of centroids, queries"),
])
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(RecsysError) as e:
        parse_index_spec(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_indexes_for_the_catalog():
    from recsys.retrieval.index import build_index
    x = clustered(500, d=30)
    with pytest.raises(RecsysError, match=r"retrieval.nlist: 1000 lists for a catalog of 500 items"):
        build_index(x, parse_index_spec("ivf,nlist=1000,nprobe=4"))
    with pytest.raises(RecsysError, match=r"retrieval.pq_m: 8 sub-quantizers do not divide the embedding dim 30"):
        build_index(x, parse_index_spec("ivfpq,nlist=8,m=8,nbits=4"))
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RecsysError, match="retrieval.device=gpu: faiss sees no GPU"):
            build_index(x, parse_index_spec("ivf,nlist=8,nprobe=2,device=gpu"))


# --- real faiss indexes --------------------------------------------------------------------------------------------


def test_indexes_against_exact_search():
    from recsys.retrieval.index import build_index, exact_topk, recall_at, set_search_params
    x = clustered(4000)
    q = torch.from_numpy(clustered(100, seed=1))
    truth = exact_topk(q, torch.from_numpy(x), 10).numpy()
    recall, memory = {}, {}
    for spec in ["flat,k=10", "sq8,k=10", "fp16,k=10", "ivf,nlist=32,nprobe=32,k=10", "ivf,nlist=32,nprobe=1,k=10",
                 "ivfpq,nlist=16,nprobe=16,m=8,nbits=6,k=10", "ivfpq,nlist=16,nprobe=16,m=8,nbits=6,refine=8,k=10",
                 "hnsw,M=16,efSearch=256,k=10"]:
        index = build_index(x, parse_index_spec(spec))
        scores, ids = index.search(q, 10)
        assert ids.shape == (100, 10) and scores.shape == (100, 10)
        recall[spec], memory[spec] = recall_at(ids, truth, 10), index.memory_bytes()
    assert recall["flat,k=10"] == 1.0 and recall["ivf,nlist=32,nprobe=32,k=10"] == 1.0  # every list probed: exact
    assert recall["ivf,nlist=32,nprobe=1,k=10"] < 0.95  # one list of 32 misses neighbours
    assert recall["fp16,k=10"] > 0.99 and recall["sq8,k=10"] > 0.8 and recall["hnsw,M=16,efSearch=256,k=10"] > 0.9
    pq = "ivfpq,nlist=16,nprobe=16,m=8,nbits=6"
    assert recall[f"{pq},refine=8,k=10"] > recall[f"{pq},k=10"]
    assert memory["sq8,k=10"] < memory["fp16,k=10"] < memory["flat,k=10"]
    assert memory["ivfpq,nlist=16,nprobe=16,m=8,nbits=6,k=10"] < memory["sq8,k=10"]
    # query-time settings change without rebuilding
    ivf = build_index(x, parse_index_spec("ivf,nlist=32,nprobe=1,k=10"))
    wide = set_search_params(ivf, parse_index_spec("ivf,nlist=32,nprobe=32,k=10"))
    assert recall_at(wide.search(q, 10)[1], truth, 10) == 1.0


def test_saved_index_remembers_its_source(tmp_path):
    from recsys.retrieval.index import cached_index, load_index
    x = torch.from_numpy(clustered(1000))
    cfg = parse_index_spec("ivf,nlist=16,nprobe=4,k=10")
    built = cached_index(tmp_path, x, cfg, fingerprint="aaaa")
    again = load_index(tmp_path / "ivf-nlist=16", parse_index_spec("ivf,nlist=16,nprobe=16,k=10"), "aaaa")
    assert again is not None and faiss.extract_index_ivf(again.index).nprobe == 16
    assert np.array_equal(again.search(x[:5], 10)[1][:, 0], built.search(x[:5], 10)[1][:, 0])
    with pytest.raises(RecsysError, match="cached index ivf.* was built from aaaa.*rebuild it"):
        cached_index(tmp_path, x, cfg, fingerprint="bbbb")
    assert cached_index(tmp_path, x, cfg, fingerprint="bbbb", rebuild=True).n_items == 1000


# --- evaluation through an index -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split():
    from recsys.data.registry import load_data
    return load_data(load_config(None, ["data.synthetic_users=200", "data.synthetic_items=300"]).data)[1]


def test_flat_index_evaluates_as_exact_full_ranking(split):
    from recsys.retrieval.evaluate import embedding_scorer, evaluate
    from recsys.retrieval.index import build_index
    from recsys.retrieval.index_eval import evaluate_index
    items = torch.from_numpy(clustered(split.n_items, seed=2))
    users = torch.from_numpy(clustered(len(split.eval_users), seed=3))
    exact = evaluate(embedding_scorer(users, split.eval_users, split.n_users, items), split, "test", progress=False)
    res = evaluate_index(users, items, build_index(items, parse_index_spec("flat,k=100")), split, "test")
    # the index's candidates, history masked after over-fetching, rank the targets exactly as full ranking does
    finite = np.isfinite(exact.ranks) & (exact.ranks < 100)
    assert np.array_equal(res.index.ranks[finite], exact.ranks[finite])
    assert np.isinf(res.index.ranks[~finite]).all()  # not among the k candidates: ranked after all of them
    assert res.index.metrics["ndcg@10"] == pytest.approx(exact.metrics["ndcg@10"])
    assert res.exact.metrics == pytest.approx(exact.metrics)
    assert res.recall_vs_exact == {"recall@10": 1.0, "recall@100": 1.0}


def test_approximate_index_loses_recall_and_never_returns_history(split):
    from recsys.retrieval.evaluate import history_mask
    from recsys.retrieval.index import build_index
    from recsys.retrieval.index_eval import _masked_topk, evaluate_index
    items = torch.from_numpy(clustered(split.n_items, seed=2))
    users = torch.from_numpy(clustered(len(split.eval_users), seed=3))
    index = build_index(items, parse_index_spec("ivf,nlist=16,nprobe=1,k=20"))
    res = evaluate_index(users, items, index, split, "test")
    assert res.recall_vs_exact["recall@10"] < 0.9
    assert res.index.metrics["recall@20"] <= res.exact.metrics["recall@20"] + 1e-9
    b = split.eval_users[:16]
    mask = history_mask(split, b, "test")
    _, ids = index.search(users[:16], 20 + int(mask.sum(1).max()))
    for row, found in enumerate(_masked_topk(ids, mask, 20)):
        assert not mask[row, torch.from_numpy(found)].any()


# --- a trained run through an index: the CLI, its cache, its online request ----------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    from conftest import tiny_run_args, train_run
    root = tmp_path_factory.mktemp("index_run")
    return train_run(tiny_run_args(tiny_model, root), root, "r")


def test_evaluate_through_an_index_from_the_cli(run, capsys):
    assert main(["evaluate", str(run), "--stage", "val", "--index", "ivf,nlist=4,nprobe=4,k=100"]) == 0
    out = capsys.readouterr().out
    assert "(exact)" in out and "(ivf,nlist=4,nprobe=4,k=100)" in out and "recall@10 1.0000" in out
    cache = run.parent.parent / "cache" / "index" / "r"
    assert (cache / "ivf-nlist=4" / "index.faiss").is_file() and list(cache.glob("items-*.pt"))


@pytest.mark.parametrize("spec, message", [
    ("hnws", "unknown index 'hnws'"),
    ("hnsw,efSearch=16", "ef_search (16) must be >= k (100)"),
    ("ivf,nlist=1000,nprobe=2", "retrieval.nlist: 1000 lists for a catalog of 150 items"),
    ("ivfpq,nlist=2,m=5,nbits=4", "retrieval.pq_m: 5 sub-quantizers do not divide the embedding dim 32"),
    ("flat,device=gpu", "retrieval.device=gpu"),
])
def test_bad_index_input_through_the_cli(run, spec, message, capsys):
    if "device=gpu" in spec and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    assert main(["evaluate", str(run), "--index", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_changed_run_refuses_its_cached_index(run, tmp_path, capsys):
    import shutil
    changed = tmp_path / "results" / "runs" / "r"
    shutil.copytree(run, changed)
    assert main(["evaluate", str(changed), "--index", "flat"]) == 0
    ckpt = changed / "checkpoints" / "best.ckpt"
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k in state["state_dict"] if k.endswith("projection.weight") or "encoder" in k)
    state["state_dict"][key] = state["state_dict"][key] + 0.01  # "retrained"
    torch.save(state, ckpt)
    capsys.readouterr()
    assert main(["evaluate", str(changed), "--index", "flat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cached index flat,k=100 was built from" in err and "--rebuild-index" in err and "\n" not in err
    assert main(["evaluate", str(changed), "--index", "flat", "--rebuild-index"]) == 0


def test_online_request_through_an_index(run):
    from recsys.recipes.retrieval_index import online_request_index
    call, costs = online_request_index(run, "hnsw,M=8,efSearch=32,k=10")
    scores, ids = call()
    assert ids.shape == (1, 10) and (ids >= 0).all() and costs["n_items"] == 150
    assert costs["spec"].startswith("hnsw") and costs["search"]()[1].shape == (1, 10)
    _, exact = online_request_index(run, "exact,k=10")
    _, ivf = online_request_index(run, "ivf,nlist=8,nprobe=1,k=10")
    assert costs["flops"] == exact["flops"]  # at 150 items HNSW's search visits them all: no cheaper
    assert ivf["flops"] < exact["flops"]


def test_a_run_whose_config_names_an_index_is_served_through_it(run):
    """online_request (what sweeps and benchmarks time) follows the run's retrieval section."""
    from recsys.recipes.profile import online_request
    over = ["retrieval.index=ivf", "retrieval.nlist=8", "retrieval.nprobe=1", "retrieval.k=10"]
    call, costs = online_request(run, overrides=over)
    scores, ids = call()
    assert ids.shape == (1, 10) and costs["spec"].startswith("ivf") and "nprobe=1" in costs["spec"]
    _, exact = online_request(run)
    assert "spec" not in exact and costs["flops"] < exact["flops"] and costs["params"] == exact["params"]


def test_a_sequence_run_through_an_index(tmp_path, tiny_model):
    """A sequence user tower (with its adaptor) searched through an index: a flat index ranks exactly as the
    run's own evaluation; its online request reads N cached vectors, then searches."""
    import json

    from conftest import tiny_run_args, train_run

    from recsys.recipes.retrieval_index import evaluate_run_index, online_request_index
    seq = train_run(tiny_run_args(tiny_model, tmp_path), tmp_path, "seq", "model.user_tower=sequence",
                    "model.sequence_items=6", "model.sequence_layers=1", "model.sequence_heads=2",
                    "model.freeze_item_tower=true", "model.sequence_adaptor=true")
    result = evaluate_run_index(seq, "flat,k=100", "val", progress=False)
    trained = json.loads((seq / "metrics.json").read_text())["val"]
    assert result.recall_vs_exact["recall@10"] == 1.0
    assert result.index.metrics["ndcg@10"] == pytest.approx(trained["ndcg@10"], abs=1e-6)
    call, costs = online_request_index(seq, "hnsw,M=8,efSearch=32,k=10")
    assert call()[1].shape == (1, 10) and costs["shape"].seq_len == 6


# --- the cost model's index term --------------------------------------------------------------------------------


def test_index_work_and_online_cost():
    from recsys.efficiency.cost import online_cost
    from recsys.efficiency.index_cost import index_work
    from recsys.efficiency.shape import Shape
    from recsys.models.encoder import model_config
    n, d = 1_000_000, 384
    flat = index_work(parse_index_spec("flat"), n, d)["madds"]
    assert flat == n * d
    ivf = [index_work(parse_index_spec(f"ivf,nlist=4096,nprobe={p}"), n, d)["madds"] for p in (8, 32)]
    assert ivf[0] < ivf[1] < flat / 20
    hnsw = index_work(parse_index_spec("hnsw,M=32,efSearch=128"), n, d)["madds"]
    assert hnsw < flat / 100
    shape = Shape.dense_from_hf_config(model_config("minilm"), seq_len=32)
    exact, via = online_cost(shape, n), online_cost(shape, n, parse_index_spec("ivf,nlist=4096,nprobe=8"))
    assert via["user_flops"] == exact["user_flops"] and via["retrieval_flops"] < exact["retrieval_flops"] / 50


def test_penalties_see_the_index(tmp_path):
    """The combined loss's cost ratios with a retrieval index: FLOPs count the index's search instead of exact
    scoring, the predicted latency adds its calibrated search time, both stay differentiable in output gates."""
    from recsys.efficiency.cost import SoftShape, cost
    from recsys.efficiency.index_cost import index_work
    from recsys.efficiency.predictor import predict
    from recsys.efficiency.shape import LayerShape, Shape
    from recsys.losses.penalties import CostNormaliser
    from recsys.serving.index_route import calibrate_index_latency
    from recsys.serving.latency_tables import load_or_build

    n = 200_000
    base = Shape(layers=(LayerShape((0, 1, 2, 3), 128),) * 2, hidden=64, head_dim=16, n_heads_dense=4, ffn_dense=128,
                 vocab_size=30522, max_positions=128, type_vocab_size=2, seq_len=16, output_dim=32)
    ivf = parse_index_spec("ivf,nlist=1024,nprobe=8")
    exact, via = CostNormaliser(base, n), CostNormaliser(base, n, index=ivf)
    tower = cost(base.replace(batch=1))["flops"]
    assert exact.dense["flops"] == pytest.approx(tower + 2 * n * 32)
    assert via.dense["flops"] == pytest.approx(tower + index_work(ivf, n, 32)["flops"])
    assert via.dense["flops"] - tower < (exact.dense["flops"] - tower) / 10  # 8 of 1024 lists scanned
    soft = SoftShape.from_shape(base)
    soft.out = torch.full((32,), 0.5, dtype=torch.float64, requires_grad=True)  # half the output dims expected
    via(soft)["flops"].backward()
    assert soft.out.grad is not None and (soft.out.grad > 0).all()
    tables = load_or_build(base, cache_dir=tmp_path, items=(1000, 4000), dims=(16, 64), seq=(16, 32),
                           min_seconds=0.01, progress=False)
    model = calibrate_index_latency(dim=32, kinds=("ivf",), scale=0.05, min_seconds=0.05, cached=False)
    with pytest.raises(ValueError, match="needs its latency model"):
        CostNormaliser(base, n, tables, ivf)
    lat = CostNormaliser(base, n, tables, ivf, model)
    expected = predict(tables, base.replace(batch=1)) + model.predict(ivf, n, 32)
    assert lat.dense["latency"] == pytest.approx(expected, rel=1e-6)


def test_index_latency_model_is_calibrated_here():
    from recsys.serving.index_route import calibrate_index_latency
    model = calibrate_index_latency(dim=32, kinds=("flat", "ivf"), scale=0.05, min_seconds=0.05, cached=False)
    assert set(model.scale) == {"flat", "ivf"} and all(v >= 0 for v in model.overhead_ms.values())
    few, many = (model.predict(parse_index_spec(f"ivf,nlist=256,nprobe={p}"), 80_000, 32) for p in (2, 64))
    assert 0 < few < many
    assert model.predict(parse_index_spec("flat"), 1_000_000, 32) > model.predict(parse_index_spec("flat"), 10_000, 32)


# --- baselines at catalog scale ----------------------------------------------------------------------------------


def _dense_topk_reference(x, k):
    """Dense cosine, top-k per row by (value desc, index asc)."""
    x = x.astype(np.float64).toarray()
    co = x.T @ x
    norms = np.sqrt(np.diag(co))
    sim = co / np.maximum(np.outer(norms, norms), 1e-12)
    np.fill_diagonal(sim, 0.0)
    if k is not None:
        top = np.argsort(-np.round(sim, 12), axis=1, kind="stable")[:, :k]
        out = np.zeros_like(sim)
        np.put_along_axis(out, top, np.take_along_axis(sim, top, 1), 1)
        sim = out
    return sim


@pytest.mark.parametrize("k", [None, 5, 50])
def test_sparse_itemknn_equals_dense(k):
    from recsys.retrieval.baselines import itemknn_sparse, itemknn_weights
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((400, 300)) < 0.04).astype(np.float64))
    w = itemknn_sparse(x, k, block=64)
    assert sp.issparse(w) and w.nnz <= 300 * (k or 300)
    np.testing.assert_allclose(w.toarray(), _dense_topk_reference(x, k), atol=1e-12)
    if k is None:
        np.testing.assert_allclose(w.toarray(), itemknn_weights(x, None), atol=1e-12)


def test_sparse_itemknn_matches_dense_metrics_on_ml100k():
    from conftest import SHARED_DATA

    from recsys.data.registry import load_data
    from recsys.retrieval.baselines import itemknn_sparse, itemknn_weights, matrix_scorer
    from recsys.retrieval.evaluate import evaluate
    if not (SHARED_DATA / "ml-100k" / "u.data").is_file():
        pytest.skip("ML-100K not available")
    split = load_data(load_config(None, ["data.name=ml-100k", f"data.path={SHARED_DATA / 'ml-100k'}"]).data)[1]
    x = split.matrix("val")
    for k in (None, 100):
        dense = evaluate(matrix_scorer(split, "val", itemknn_weights(x, k)), split, "val", progress=False)
        sparse = evaluate(matrix_scorer(split, "val", itemknn_sparse(x, k)), split, "val", progress=False)
        tol = 0 if k is None else 2e-3  # k = 100: ties at the 100th neighbour may be broken differently
        assert sparse.metrics["ndcg@10"] == pytest.approx(dense.metrics["ndcg@10"], abs=tol + 1e-9)


def test_ease_states_its_cost_and_refuses_large_catalogs(tmp_path, capsys):
    from recsys.retrieval.baselines import check_ease
    line = check_ease(17_000)
    assert "EASE^R on 17,000 items" in line and "2.31 GB each" in line and "TFLOP" in line
    with pytest.raises(RecsysError, match="beyond baselines.ease_max_items=20,000; use ItemKNN"):
        check_ease(50_000)
    rc = main(["baselines", "--models", "ease", "data.synthetic_users=50", "data.synthetic_items=300",
               "baselines.ease_max_items=200", f"tracking.results_dir={tmp_path}", "tracking.progress_bar=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "EASE^R on 300 items" in err and "use ItemKNN" in err and "\n" not in err
    assert not (tmp_path / "baselines").exists()


def test_benchmark_smoke_and_its_notebook(tmp_path):
    """experiments/retrieval_scale.py's pieces at a tiny size, and the notebook on a fixture of its schema."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    from recsys.tracking.schemas import problems
    sys.path.insert(0, str(REPO / "experiments"))
    import retrieval_scale as rs
    real = clustered(600, d=48, seed=4)
    gen = rs.Generator(real[:500], clusters=8, rank=4)
    fake = gen.sample(2000, seed=0)
    assert fake.shape == (2000, 48) and np.allclose(np.linalg.norm(fake, axis=1), 1, atol=1e-5)
    check = {"real": rs.recall_curve(real[:500], real[500:]), "generated": rs.recall_curve(fake[:500], real[500:])}
    assert [r["recall@10"] for r in check["real"]["ivf"]] == sorted(r["recall@10"] for r in check["real"]["ivf"])
    entry = {"spec": "ivf,nlist=8,nprobe=2,k=10", "recall@10": 0.96, "qps_b1": 5000.0, "qps_b64": 20000.0,
             "build_s": 0.1, "memory_mb": 1.0, "speedup_b1": 25.0}
    data = {"catalogs": [{"n_items": 2000, "exact": {"qps_b1": 200.0, "qps_b64": 900.0}, "indexes": [entry]}],
            "bar": rs.bar([{"n_items": 2000, "indexes": [entry]}]), "generator_check": check, "blas": {},
            "peak_rss_mb": 100.0, "hardware": {}}
    assert data["bar"]["met"] and problems("retrieval_scale.json", data) == []
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "retrieval_scale.json").write_text(json.dumps(data))
    env = {**os.environ, "RECSYS_RESULTS": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "jupyter", "execute", "retrieval_scale.ipynb"], cwd=REPO / "notebooks",
                   env=env, check=True, capture_output=True)
    assert (tmp_path / "figures" / "retrieval_scale.png").stat().st_size > 10_000
