"""Issue 24: sequence towers that start where zero-shot ends, trained the way SASRec is; item representations and
encoders; the cold-start protocol."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_run_args, train_run

from recsys.config import ModelConfig
from recsys.data.split import Split, hold_out_items
from recsys.losses.catalog import CatalogSoftmaxLoss
from recsys.models.sequence_tower import build_sequence_tower, lookup, mean_item_scorers, recent_items

CAUSAL = ["model.user_tower=sequence", "model.freeze_item_tower=true", "model.sequence_items=8",
          "model.sequence_hidden=16", "model.sequence_readout=mean_residual", "model.sequence_causal=true",
          "train.objective=causal", "train.check_val_every_n_epoch=1"]


def _split(n_items=30, n_users=12, seed=0) -> Split:
    rng = np.random.default_rng(seed)
    train = [rng.choice(n_items, size=int(rng.integers(3, 9)), replace=False) for _ in range(n_users)]
    return Split(n_items, train, rng.integers(0, n_items, n_users), rng.integers(0, n_items, n_users))


@pytest.mark.parametrize("extra", [{}, {"sequence_adaptor": True}, {"sequence_moe": 3},
                                   {"item_representation": "text+id", "id_dropout": 0.5, "sequence_adaptor": True}])
def test_a_mean_residual_tower_scores_like_the_zero_shot_mean_at_step_0(extra):
    torch.manual_seed(0)
    cfg = ModelConfig(user_tower="sequence", sequence_items=6, sequence_hidden=8, sequence_readout="mean_residual",
                      sequence_causal=True, **extra)
    items = F.normalize(torch.randn(30, 12), dim=-1)
    tower = build_sequence_tower(cfg, 12, 6, n_catalog=30).eval()
    split = _split()
    users = split.eval_users
    ids = recent_items([split.history(int(u), "test") for u in users], 6)
    ours = tower(*lookup(ids, items), ids=ids)  # [U, d]
    zero_shot = mean_item_scorers(items, split, 6, ("test",))["test"](users)  # [U, n_items]
    assert torch.allclose(ours @ items.T, zero_shot, atol=1e-5)
    # and it is not a constant: after a step of training the residual branch moves it
    tower.train()
    opt = torch.optim.SGD(tower.parameters(), lr=1.0)
    h = tower.encode(*lookup(ids, tower.represent_catalog(items)), positions="all")
    CatalogSoftmaxLoss()(h, tower.represent_catalog(items), ids, torch.tensor(0.1)).backward()
    opt.step()
    assert not torch.allclose(tower.eval()(*lookup(ids, items), ids=ids), ours, atol=1e-4)


def test_a_dot_score_tower_ranks_like_the_mean_at_step_0_and_learns_norms():
    """model.sequence_score=dot: nothing is re-normalised, so at step 0 the scores are the zero-shot mean's up to
    each user's positive scale (the same ranking), and training may give items norms other than 1."""
    torch.manual_seed(0)
    cfg = ModelConfig(user_tower="sequence", sequence_items=6, sequence_hidden=8, sequence_readout="mean_residual",
                      sequence_causal=True, sequence_adaptor=True, sequence_score="dot")
    items = F.normalize(torch.randn(30, 12), dim=-1)
    tower = build_sequence_tower(cfg, 12, 6).eval()
    split = _split()
    users = split.eval_users
    ids = recent_items([split.history(int(u), "test") for u in users], 6)
    ours = tower(*lookup(ids, items)) @ items.T  # [U, n_items]
    zero_shot = mean_item_scorers(items, split, 6, ("test",))["test"](users)  # [U, n_items] cosine scores
    scale = ours.norm(dim=-1, keepdim=True) / zero_shot.norm(dim=-1, keepdim=True)  # [U, 1]
    assert torch.allclose(ours, zero_shot * scale, atol=1e-5) and (scale > 0).all()
    assert not torch.allclose(scale, torch.ones_like(scale))  # a mean of unit vectors is shorter than 1: not cosine
    tower.train()
    opt = torch.optim.SGD(tower.parameters(), lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        keys = tower.represent_catalog(items)
        h = tower.encode(*lookup(ids, keys), positions="all")
        CatalogSoftmaxLoss()(h, keys, ids, torch.tensor(0.1)).backward()
        opt.step()
    norms = tower.eval().represent_catalog(items).norm(dim=-1)
    assert (norms - 1).abs().max() > 1e-3


def test_a_hidden_space_tower_is_sasrec_over_a_text_map_with_tied_embeddings():
    """model.item_space=hidden: items are text_map(text vector) + an ID embedding in the transformer's width,
    scored against the same table; the IDs start as SASRec's (random), so two items with the same text differ at
    step 0 — unlike the item-space text+id tower, whose IDs start at zero (text only)."""
    torch.manual_seed(0)
    items = F.normalize(torch.randn(30, 12), dim=-1)
    items[7] = items[3]  # two items with the same text
    kw = dict(user_tower="sequence", sequence_items=6, sequence_hidden=8, sequence_causal=True,
              item_representation="text+id", sequence_score="dot")
    tower = build_sequence_tower(ModelConfig(item_space="hidden", **kw), 12, 6, n_catalog=30).eval()
    keys = tower.represent_catalog(items)  # [30, 8]
    assert keys.shape == (30, 8) and tower.dim == tower.key_dim == 8
    assert tower.projection is None and tower.input is None
    assert torch.allclose(keys, tower.text_map(items) + tower.item_ids.weight, atol=1e-6)
    assert (keys[3] - keys[7]).abs().max() > 1e-2  # the IDs tell them apart from the start
    split = _split()
    ids = recent_items([split.history(int(u), "test") for u in split.eval_users], 6)
    users = tower(*lookup(ids, items), ids=ids)  # [U, 8]: the history read through the same table
    assert torch.allclose(users, tower.encode(*lookup(ids, keys)), atol=1e-6)
    item_space = build_sequence_tower(ModelConfig(**kw), 12, 6, n_catalog=30).eval()
    same = item_space.represent_catalog(items)  # [30, 12]: text + zero IDs
    assert item_space.key_dim == 12 and torch.allclose(same[3], same[7])
    with pytest.raises(ValueError, match="sequence_readout=last"):
        ModelConfig(item_space="hidden", **{**kw, "sequence_readout": "mean_residual"})
    with pytest.raises(ValueError, match="user_tower=sequence"):
        ModelConfig(item_space="hidden")


def test_a_causal_tower_does_not_read_the_future():
    torch.manual_seed(0)
    cfg = ModelConfig(user_tower="sequence", sequence_items=5, sequence_hidden=8, sequence_causal=True,
                      sequence_readout="mean_residual")
    tower = build_sequence_tower(cfg, 8, 5).eval()
    with torch.no_grad():
        tower.projection.weight.normal_()  # a live residual branch
    x, mask = F.normalize(torch.randn(2, 5, 8), dim=-1), torch.ones(2, 5, dtype=torch.bool)
    changed = x.clone()
    changed[:, 3:] = F.normalize(torch.randn(2, 2, 8), dim=-1)
    a, b = tower.encode(x, mask, positions="all"), tower.encode(changed, mask, positions="all")
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)  # positions 0-2 never see items 3-4
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)


def test_catalog_softmax_is_cross_entropy_over_the_catalog_at_real_positions():
    torch.manual_seed(0)
    h, keys = F.normalize(torch.randn(2, 3, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    targets = torch.tensor([[-1, 2, 5], [0, 1, -1]])
    got = CatalogSoftmaxLoss()(h, keys, targets, torch.tensor(0.5))
    logits = torch.stack([h[0, 1], h[0, 2], h[1, 0], h[1, 1]]) @ keys.T / 0.5
    want = -torch.log_softmax(logits, -1)[torch.arange(4), torch.tensor([2, 5, 0, 1])].mean()
    assert torch.allclose(got, want, atol=1e-6)
    excluded = torch.zeros(6, dtype=torch.bool)
    excluded[3] = True  # a cold item: not even a negative
    masked = CatalogSoftmaxLoss()(h, keys, targets, torch.tensor(0.5), excluded)
    logits[:, 3] = float("-inf")
    want = -torch.log_softmax(logits, -1)[torch.arange(4), torch.tensor([2, 5, 0, 1])].mean()
    assert torch.allclose(masked, want, atol=1e-6)


def test_cold_items_never_appear_in_training_and_stay_targets():
    split = _split(n_items=40, n_users=30)
    cold = hold_out_items(split, 0.25, seed=1)
    assert len(cold.cold) == 10
    assert not np.isin(np.concatenate(cold.train), cold.cold).any()
    assert (cold.val == split.val).all() and (cold.test == split.test).all()
    assert "cold-start" in cold.protocol and "warm" in split.protocol
    assert hold_out_items(split, 0.0) is split


HIDDEN = ["model.item_space=hidden", "model.sequence_readout=last", "model.sequence_score=dot",
          "model.temperature=1.0"]


@pytest.mark.parametrize("space", [[], HIDDEN], ids=["item_space", "hidden_space"])
def test_causal_text_id_run_on_the_cold_split_reports_warm_and_cold(tmp_path, tiny_model, capsys, space):
    run = train_run(tiny_run_args(tiny_model, tmp_path), tmp_path, "cold", *CAUSAL,
                    "model.item_representation=text+id", "model.id_dropout=0.2", "data.cold_items=0.2", *space)
    err = capsys.readouterr().err
    assert "no trained ID embedding" in err  # text+id on cold items: says what the model does
    m = json.loads((run / "metrics.json").read_text())
    assert m["stopped_by"] in ("budget", "early_stopping") and "cold-start (30 items" in m["protocol"]
    t = m["test"]
    assert t["warm/users"] + t["cold/users"] == m["evaluated_users"] and t["cold/users"] > 0
    weighted = (t["warm/ndcg@10"] * t["warm/users"] + t["cold/ndcg@10"] * t["cold/users"]) / m["evaluated_users"]
    assert weighted == pytest.approx(t["ndcg@10"], abs=1e-9)
    # the cold items' score offset (train.cold_offset=val): chosen on validation from its recorded grid, and the
    # uncalibrated numbers kept beside the calibrated ones
    c = m["cold_offset"]
    assert c["beta"] in [r["beta"] for r in c["grid"]] and c["grid"][0]["beta"] == 0.0 and len(c["grid"]) > 1
    assert m["val"]["ndcg@10"] == pytest.approx(max(r["ndcg@10"] for r in c["grid"]), abs=1e-6)
    assert m["val_uncalibrated"]["ndcg@10"] == pytest.approx(c["grid"][0]["ndcg@10"], abs=1e-6)
    assert set(m["test_uncalibrated"]) == set(t)
    # the cold items' ID embeddings were never trained: zero (item space: from the start; hidden space, whose IDs
    # start random: zeroed before training), so a cold item is scored by its text alone
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    from recsys.config import load_config
    from recsys.data.registry import load_data
    _, split = load_data(load_config(run / "config.yaml").data)
    ids = state["user_tower.item_ids.weight"]
    assert ids[split.cold].abs().max() == 0 and ids.abs().sum() > 0
    # and it reads back through `recsys evaluate` with the same metrics
    from recsys.recipes.evaluate import evaluate_run
    assert evaluate_run(run, "test", progress=False).metrics["ndcg@10"] == pytest.approx(t["ndcg@10"], abs=1e-6)


def test_a_hugging_face_item_encoder_is_encoded_once_and_cached(tmp_path, tiny_model, capsys, monkeypatch):
    from recsys.models.item_encoder import cache_meta, encode_catalog
    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path / "cache"))
    texts = ["a red apple", "the green pear in a bowl", "cat"]
    mean = encode_catalog(tiny_model, texts, 16, "mean", progress=False)
    assert torch.allclose(mean.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(mean, encode_catalog(tiny_model, texts, 16, "cls", progress=False))
    last = encode_catalog(tiny_model, texts, 16, "last", progress=False)
    meta = cache_meta(tiny_model, texts, 16, "last")
    assert meta["n"] == 3 and meta["params"] > 0 and meta["flops_per_item"] > 0 and meta["items_per_s"] > 0
    # the cached entry is read back (the same tensor), and an entry written for other texts is re-encoded
    assert torch.equal(encode_catalog(tiny_model, texts, 16, "last", progress=False), last)
    from recsys.models.item_encoder import cache_key, default_cache_dir
    entry = default_cache_dir() / cache_key(tiny_model, texts, 16, "last", "fp32")
    meta["texts_sha256"] = "0" * 64
    (entry / "meta.json").write_text(json.dumps(meta))
    again = encode_catalog(tiny_model, texts, 16, "last", progress=False)
    assert "computed for other item texts" in capsys.readouterr().err
    assert torch.allclose(again, last, atol=1e-6)


def test_a_run_over_an_auto_item_encoder_trains_and_evaluates(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path / "cache"))
    run = train_run(tiny_run_args(tiny_model, tmp_path), tmp_path, "auto", *CAUSAL,
                    "model.item_encoder_backend=auto", f"model.item_encoder={tiny_model}", "model.item_pooling=cls")
    m = json.loads((run / "metrics.json").read_text())
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("item_tower.") for k in state)  # the frozen HF encoder is not in the checkpoint
    from recsys.recipes.evaluate import evaluate_run
    assert evaluate_run(run, "test", progress=False).metrics["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"],
                                                                                          abs=1e-6)


def _cli(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "recsys.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600, env={**__import__("os").environ, "RECSYS_CACHE_DIR": str(tmp_path / "c")})


def test_bad_item_encoder_inputs_are_one_line(tmp_path, tiny_model):
    base = ["train", *tiny_run_args(tiny_model, tmp_path), *CAUSAL, "model.item_encoder_backend=auto",
            "tracking.run_name=bad"]
    not_a_model = tmp_path / "weird"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cases = {
        "model.item_pooling=max": "item_pooling",
        f"model.item_encoder={tmp_path / 'missing.gguf'}": "GGUF file not found",
        f"model.item_encoder={not_a_model}": "item encoder",
    }
    for override, needle in cases.items():
        r = _cli(*base, override, tmp_path=tmp_path)
        assert r.returncode == 2, (override, r.stderr[-500:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, (override, r.stderr)
        assert not (tmp_path / "results" / "runs" / "bad").exists()
    r = _cli("train", *tiny_run_args(tiny_model, tmp_path), "train.objective=causal", tmp_path=tmp_path)
    assert r.returncode == 2 and "train.objective=causal" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_families_benchmark_smoke(tmp_path, tiny_model):
    out = tmp_path / "f.json"
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "families.py"), "--smoke", "--seeds", "0",
                        "--encoders", "minilm", "--encoder", tiny_model, "--results", str(tmp_path / "results"),
                        "--out", str(out), "--rounds", "2", "--grid", "model.sequence_dropout=0.1,0.3"],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    names = {(row["split"], row["name"]) for row in d["rows"]}
    # the sequence towers' validation grid: both points tried on warm, the best on validation chosen for every split
    for row in d["rows"]:
        if row["name"].startswith("sequence_"):
            tried = row["grid"]
            assert [t["model.sequence_dropout"] for t in tried] == ["0.1", "0.3"]
            best = max(tried, key=lambda t: t["val_ndcg@10"])
            assert row["hyperparameters"] == {"model.sequence_dropout": best["model.sequence_dropout"]}
            assert all(f"sequence_dropout{best['model.sequence_dropout']}-seed" in run for run in row["runs"])
    for split in ("warm", "cold"):
        for name in ("ease", "itemknn", "sasrec", "zero_shot", "mean_minilm", "sequence_minilm_text",
                     "sequence_minilm_text+id"):
            assert (split, name) in names
    assert "bar" in d and "cold_aim" in d and d["reference_model"]["name"]
    cold = [row for row in d["rows"] if row["split"] == "cold"]
    assert all("cold/ndcg@10" in row for row in cold)


def _families_fixture() -> dict:
    def row(name, split, ndcg, ms=None, flops=None, cold=None):
        r = {"name": name, "split": split, "ndcg@10": ndcg, "recall@10": 2 * ndcg, "n_seeds": 3, "ndcg@10_std": 0.001}
        if ms is not None:
            r["measured_ms_median"] = ms
        if flops is not None:
            r["offline_item_encoder"] = {"flops_per_item": flops}
        if cold is not None:
            r["cold/ndcg@10"] = cold
        return r
    rows = [row("sasrec", "warm", 0.09, 0.9), row("ease", "warm", 0.07, 0.06),
            row("sequence_minilm_text", "warm", 0.08, 1.1, 3e8), row("sequence_mpnet_text", "warm", 0.085, 1.3, 2.5e9),
            row("sasrec", "cold", 0.07, cold=0.0), row("sequence_minilm_text", "cold", 0.06, cold=0.04)]
    return {"dataset": "fixture", "rows": rows, "protocols": {"warm": "w", "cold": "c"}, "seeds": [0, 1, 2],
            "reference_model": {"name": "sasrec"}, "hardware": {"cpu": "fixture"}}


def test_families_notebook_draws_its_figures(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    from recsys.tracking.schemas import problems
    data = _families_fixture()
    assert problems("ml100k_families.json", data) == []
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "ml100k_families.json").write_text(json.dumps(data))
    # a variant from `--out`, measured in its own process: its own panel and table rows
    (tmp_path / "benchmarks" / "ml100k_families_hidden.json").write_text(json.dumps(data))
    nb = nbformat.read(REPO / "notebooks" / "families.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(REPO / "notebooks")}}).execute(
        env={**os.environ, "RECSYS_RESULTS": str(tmp_path)})
    for name in ("families.png", "families_cold.png"):
        png = tmp_path / "figures" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "text/html" in o.get("data", {})]
    assert html and "sequence_mpnet_text" in html[0] and "ml100k (cold)" in html[0]
    assert "ml100k_hidden (warm)" in html[0]


def test_families_item_tower_from_must_be_a_finished_run(tmp_path):
    """`--item-tower-from` a folder that is no finished run: one line, exit 2, nothing trained."""
    (tmp_path / "half").mkdir()
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "families.py"), "--smoke", "--item-tower-from",
                        str(tmp_path / "half"), "--results", str(tmp_path / "results")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "not a finished run" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "results" / "runs").exists()


@pytest.mark.parametrize("spec, needle", [("model.sequence_dropout", "--grid: expected KEY=V1,V2"),
                                          ("model.sequence_dropout=", "--grid: expected KEY=V1,V2"),
                                          ("model.no_such_key=1,2", "no_such_key")])
def test_families_grid_refuses_a_bad_spec_before_training(tmp_path, spec, needle):
    """A malformed `--grid` or an unknown key in it: one line, exit 2, nothing trained."""
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "families.py"), "--smoke", "--grid", spec,
                        "--results", str(tmp_path / "results")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "results" / "runs").exists()


def test_finetuned_item_tower_goes_under_the_sequence_tower_frozen(tmp_path, tiny_model):
    """The `finetuned` encoder's overrides: the text run's item tower, its architecture and token budget, copied
    into the sequence tower's item side (equal weights), which stays frozen."""
    sys.path.insert(0, str(REPO / "experiments"))
    from families import REPRESENTATIONS, finetuned_encoder

    from recsys.runs import load_run

    args = tiny_run_args(tiny_model, tmp_path)
    text = train_run(args, tmp_path, "text", "data.item_max_tokens=12")
    over = finetuned_encoder(text)
    assert f"model.item_tower_from={text}" in over and "data.item_max_tokens=12" in over
    seq = train_run(args, tmp_path, "seq", *over, *REPRESENTATIONS["text"], "train.objective=causal",
                    "model.user_tower=sequence", "model.sequence_items=4", "model.sequence_layers=1",
                    "model.sequence_hidden=16", "model.freeze_item_tower=true", "model.sequence_causal=true")
    _, a = load_run(text)
    _, b = load_run(seq)
    for (k, w), v in zip(a.item_tower.state_dict().items(), b.item_tower.state_dict().values(), strict=True):
        assert torch.equal(w, v), k


def test_sasrec_pieces_are_per_grid_point_so_a_wider_grid_trains_only_its_new_points(tmp_path):
    """families.py keeps SASRec per (seed, point): widening `--sasrec` reuses the trained points, trains the new
    one, re-chooses on validation over all of them and trains only the chosen point with the other seeds."""
    sys.path.insert(0, str(REPO / "experiments"))
    from families import SMOKE, sasrec_rows

    from recsys.config import load_config
    from recsys.data.registry import load_data

    def cfg(lens: str):
        return load_config(None, [*SMOKE, "sasrec.hidden=[16]", "sasrec.dropout=[0.2]", f"sasrec.max_len={lens}",
                                  "sasrec.epochs=2", "sasrec.eval_every=1", "sasrec.max_minutes=null"])
    _, split = load_data(cfg("[4]").data)
    rows, chosen, _ = sasrec_rows(split, cfg("[4]").sasrec, [0], tmp_path, None)
    first = tmp_path / "sasrec_seed0_h16_p0.2_L4.json"
    assert chosen["max_len"] == 4 and [g["max_len"] for g in rows["grid"]] == [4] and first.is_file()
    stamp = first.stat().st_mtime_ns
    rows, chosen, model = sasrec_rows(split, cfg("[4,6]").sasrec, [0, 1], tmp_path, None)
    assert first.stat().st_mtime_ns == stamp  # reused, not retrained
    assert [g["max_len"] for g in rows["grid"]] == [4, 6]
    best = max(rows["grid"], key=lambda g: g["val_ndcg@10"])
    assert chosen["max_len"] == best["max_len"] == model.max_len
    assert (tmp_path / f"sasrec_seed1_h16_p0.2_L{best['max_len']}.json").is_file()
    assert not (tmp_path / f"sasrec_seed1_h16_p0.2_L{10 - best['max_len']}.json").exists()
    assert len(rows["tests"]) == 2 and rows["epochs"] == [json.loads((tmp_path / f"sasrec_seed{s}_h16_p0.2_L"
                                                                     f"{best['max_len']}.json").read_text())["epochs"]
                                                          for s in (0, 1)]
