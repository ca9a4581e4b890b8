"""Sequence user towers: SASRec (item IDs, causal attention, full-softmax CE) and the UniSRec-style sequence tower
(a small transformer over the item tower's embeddings), trained, ranked, costed, served and refused through the
real code: tiny real BERTs, the synthetic dataset, the real Trainer and CLI."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_S, tiny_run_args, train_run

from recsys.cli import main
from recsys.config import ModelConfig, SASRecConfig
from recsys.data.split import Split
from recsys.models.sasrec import SASRec, fit_sasrec, left_padded, run_sasrec
from recsys.models.sequence_tower import build_sequence_tower, lookup, recent_items

torch.set_num_threads(1)  # tiny models: one thread is fastest, and a benchmark may be running beside the tests

SEQ = ["model.user_tower=sequence", "model.sequence_items=6", "model.sequence_layers=1", "model.sequence_heads=2"]


def cyclic_split(n_users: int = 60, n_items: int = 30, length: int = 12) -> Split:
    """Every user walks the catalog in order from a random start (i, i+1, i+2, ... mod n): the next item is a
    function of the last one, which a sequence model learns and a popularity model cannot."""
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(n_items) + np.arange(length)) % n_items for _ in range(n_users)]
    return Split(n_items, [s[:-2].astype(np.int64) for s in seqs], np.array([s[-2] for s in seqs]),
                 np.array([s[-1] for s in seqs]))


def one_line_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


# --- SASRec ---------------------------------------------------------------------------------------------------


def test_sasrec_attention_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    model = SASRec(n_items=20, hidden=16, max_len=6, n_layers=2, n_heads=2, dropout=0.0).eval()
    seq = left_padded([np.array([3, 4, 5, 6])], 6)  # [1, 6]: two padding slots, then 4 items
    later = seq.clone()
    later[0, -1] = 11  # change the newest item only
    with torch.no_grad():
        a, b = model(seq), model(later)
    assert torch.allclose(a[0, :-1], b[0, :-1], atol=1e-6)  # earlier positions never see a later item
    assert not torch.allclose(a[0, -1], b[0, -1])
    assert seq[0, :2].tolist() == [0, 0] and seq[0, 2:].tolist() == [4, 5, 6, 7]  # item i is row i + 1


def test_sasrec_learns_the_next_item_with_full_softmax():
    split = cyclic_split()
    cfg = SASRecConfig(hidden=[32], dropout=[0.0], max_len=[8], epochs=60, eval_every=10, patience=2, lr=5e-3)
    test, info = run_sasrec(split, cfg, progress=False)
    assert test.metrics["ndcg@10"] > 0.8  # random ranking of 30 items would give ≈ 0.1
    assert info["hidden"] == 32 and info["val"]["ndcg@10"] > 0.8 and len(info["grid"]) == 1


def test_sasrec_is_seeded():
    split = cyclic_split(n_users=20)
    cfg = SASRecConfig(hidden=[16], dropout=[0.2], max_len=[8], epochs=3, eval_every=1, patience=5)
    a, _ = fit_sasrec(split, cfg, 16, 0.2, 8)
    b, _ = fit_sasrec(split, cfg, 16, 0.2, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_stopped_sasrec_fit_continues_from_its_state_and_ends_as_an_uninterrupted_one(tmp_path):
    split = cyclic_split(n_users=20)
    cfg = SASRecConfig(hidden=[16], dropout=[0.2], max_len=[8], epochs=4, eval_every=1, patience=5)
    straight, _ = fit_sasrec(split, cfg, 16, 0.2, 8)
    state = tmp_path / "fit.state.pt"
    fit_sasrec(split, dataclasses.replace(cfg, epochs=2), 16, 0.2, 8, state=state)  # stopped after 2
    assert state.is_file() and torch.load(state, weights_only=False)["epoch"] == 2
    resumed, info = fit_sasrec(split, cfg, 16, 0.2, 8, state=state)
    assert info["epochs"] == 4
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), resumed.state_dict().values(),
                                                   strict=True))


def test_baselines_cli_runs_sasrec_beside_ease(tmp_path, capsys):
    args = ["baselines", "--models", "ease,sasrec", "data.synthetic_users=80", "data.synthetic_items=60",
            "sasrec.hidden=[16]", "sasrec.dropout=[0.2, 0.5]", "sasrec.max_len=[10]", "sasrec.epochs=2",
            "sasrec.eval_every=1", f"tracking.results_dir={tmp_path}", "tracking.progress_bar=false"]
    assert main(args) == 0
    out = json.loads((tmp_path / "baselines" / "synthetic" / "baselines.json").read_text())["models"]
    assert set(out) == {"ease", "sasrec"}
    assert out["sasrec"]["dropout"] in (0.2, 0.5) and 0 <= out["sasrec"]["ndcg@10"] <= 1
    assert "sasrec" in capsys.readouterr().out


def test_sasrec_on_one_item_is_one_line(tmp_path, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "interactions.csv").write_text("user_id,item_id,timestamp\n" +
                                             "".join(f"u{u},i1,{t}\n" for u in range(3) for t in range(3)))
    (folder / "items.csv").write_text("item_id,text\ni1,the only movie\n")
    from recsys.cli import main
    assert main(["baselines", "--dataset", "custom", "--path", str(folder), "--models", "sasrec",
                 f"tracking.results_dir={tmp_path}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # a one-item catalog masks every target: the data warning says so, then the one error line
    assert [ln for ln in lines if not ln.startswith("warning:")] == [lines[-1]] and "Traceback" not in lines[-1]
    assert lines[-1].startswith("error:") and "sasrec" in lines[-1] and "1 item" in lines[-1]


def test_sasrec_grid_of_zero_length_is_one_line(capsys):
    err = one_line_error(capsys, "baselines", "--models", "sasrec", "sasrec.max_len=[0]")
    assert "sasrec.max_len" in err and "> 0" in err


# --- the sequence tower ---------------------------------------------------------------------------------------


def test_sequence_tower_masks_padding_and_reads_the_newest_item_last():
    torch.manual_seed(0)
    tower = build_sequence_tower(ModelConfig(sequence_layers=2, sequence_heads=2, sequence_hidden=16,
                                             sequence_dropout=0.0), item_dim=8, n_items=5).eval()
    table = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    ids = recent_items([np.array([1, 2, 3])], 5)  # [[-1, -1, 1, 2, 3]]
    assert ids.tolist() == [[-1, -1, 1, 2, 3]]
    emb, mask = lookup(ids, table)
    noisy = emb.clone()
    noisy[0, :2] = torch.randn(2, 8)  # whatever sits in padded slots is never read
    with torch.no_grad():
        u, v = tower(emb, mask), tower(noisy, mask)
        w = tower(*lookup(recent_items([np.array([1, 3, 2])], 5), table))
    assert u.shape == (1, 8) and torch.allclose(u, v, atol=1e-6)
    assert torch.allclose(u.norm(dim=-1), torch.ones(1))
    assert not torch.allclose(u, w, atol=1e-4)  # order matters (positions)


def test_gated_sequence_tower_materializes_to_the_same_embeddings():
    from recsys.config import CompressConfig
    from recsys.efficiency.cost import cost
    from recsys.serving.materialize import materialize

    torch.manual_seed(0)
    tower = build_sequence_tower(ModelConfig(sequence_layers=2, sequence_heads=4, sequence_hidden=16,
                                             sequence_ffn=32, sequence_adaptor=True),
                                 item_dim=8, n_items=6, compress=CompressConfig(gates=["heads", "ffn", "blocks"]))
    keep = {"heads": torch.tensor([[True, False, True, False], [True, True, True, True]]),
            "ffn": torch.rand(2, 32) > 0.5, "attn_block": torch.tensor([True, False])}  # layer 1: no attention
    tower.gates.set_mask(keep)
    tower.eval()
    compact = materialize(tower)
    x = torch.nn.functional.normalize(torch.randn(3, 6, 8), dim=-1)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :3] = False
    with torch.no_grad():
        assert torch.allclose(tower(x, mask), compact(x, mask), atol=1e-5)
    shape = compact.shape
    assert shape.layers[0].n_heads == 2 and not shape.layers[1].has_attention
    assert cost(shape)["params"] < cost(tower.shape)["params"]


def test_sequence_tower_trains_frozen_and_end_to_end_and_serves(tmp_path, tiny_model, capsys):
    from recsys.recipes.profile import online_request

    args = tiny_run_args(tiny_model, tmp_path)
    frozen = train_run(args, tmp_path, "frozen", *SEQ, "model.freeze_item_tower=true", "model.sequence_adaptor=true")
    e2e = train_run(args, tmp_path, "e2e", *SEQ)
    assert "sequence_tower" in capsys.readouterr().out
    for run in (frozen, e2e):
        metrics = json.loads((run / "metrics.json").read_text())
        assert 0 <= metrics["test"]["ndcg@10"] <= 1 and metrics["steps"] > 0
    # validation while training (Lightning) and re-evaluation of the saved run rank alike (the adaptor on both sides)
    from recsys.recipes.evaluate import evaluate_run
    again = evaluate_run(frozen, "val", progress=False).metrics
    trained = json.loads((frozen / "metrics.json").read_text())
    assert again["ndcg@10"] == pytest.approx(trained["val"]["ndcg@10"], abs=1e-6)
    assert trained["best_val_ndcg@10"] == pytest.approx(trained["val"]["ndcg@10"], abs=1e-5)
    # end to end the item tower learns; frozen it stays as loaded
    from recsys.runs import load_run
    _, a = load_run(frozen)
    _, b = load_run(e2e)
    from recsys.models.two_tower import build_tower
    fresh = build_tower(tiny_model, a.model_cfg)
    w = "encoder.layers.0.ffn.up.weight"
    assert torch.equal(a.item_tower.state_dict()[w], fresh.state_dict()[w])
    assert not torch.equal(b.item_tower.state_dict()[w], fresh.state_dict()[w])
    # the online request: the small transformer over N cached vectors + exact retrieval
    call, costs = online_request(frozen)
    call()
    assert costs["shape"].seq_len == 6 and costs["n_items"] == 150
    text = train_run(args, tmp_path, "text", "train.epochs=1")
    _, text_costs = online_request(text)
    assert costs["flops"] < text_costs["flops"]  # 6 vectors through 1 layer vs 32 tokens through 2


def test_sequence_tower_with_gates_penalty_and_distillation(tmp_path, tiny_model):
    args = tiny_run_args(tiny_model, tmp_path)
    teacher = train_run(args, tmp_path, "teacher", "train.epochs=1")
    run = train_run(args, tmp_path, "gated", *SEQ, "model.freeze_item_tower=true", "compress.gates=[heads, ffn]",
                    "compress.lambda_flops=1.0", f"distill.teacher={teacher}", "distill.alpha=0.5")
    structure = json.loads((run / "metrics.json").read_text())["structure"]
    assert structure["user_shape"]["seq_len"] == 6 and 0 < structure["user_ratios"]["flops"] <= 1


def test_sequence_tower_latency_penalty_reads_its_own_tables(tmp_path, tiny_model):
    """A latency-penalised sequence tower: latency tables measured for a sequence tower (its input stage instead of
    token embeddings, N on the sequence grid, no pooling), cached under their own key, read by the penalty."""
    from recsys.runs import load_run
    from recsys.serving.latency_tables import SequenceInput, load_or_build

    args = tiny_run_args(tiny_model, tmp_path)
    run = train_run(args, tmp_path, "lat", *SEQ, "model.freeze_item_tower=true", "model.sequence_adaptor=true",
                    "compress.gates=[heads, ffn]", "compress.lambda_latency=1.0")
    structure = json.loads((run / "metrics.json").read_text())["structure"]
    assert 0 < structure["user_ratios"]["latency"] <= 1
    _, module = load_run(run)
    spec = SequenceInput.of(module.user_tower)
    assert spec == SequenceInput(item_dim=32, adaptor=True)
    tab = load_or_build(module.user_tower.shape.replace(seq_len=6, batch=1), progress=False, sequence=spec)
    assert tab.seq[-1] == 6 and all(p == 0 for p in tab.pool_ms) and tab.key["sequence"]["adaptor"] is True
    assert all(ms > 0 for ms in tab.embed_ms) and tab.attn_ms[-1][-1] > 0  # its input stage, its blocks


def test_sequence_tower_bad_inputs_are_one_line(tmp_path, tiny_model, capsys):
    args = tiny_run_args(tiny_model, tmp_path)
    err = one_line_error(capsys, "train", *args, *SEQ, "model.sequence_items=0")
    assert "model.sequence_items must be > 0, got 0" in err
    # items without text: every interaction's item is dropped, nothing to encode
    folder = tmp_path / "notext"
    folder.mkdir()
    (folder / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\nu1,i3,3\n")
    (folder / "items.csv").write_text("item_id,text\ni1,\ni2,\ni3,\n")
    err = one_line_error(capsys, "train", *args, *SEQ, "--dataset", "custom", "--path", str(folder))
    assert "without item text" in err
    # a sequence tower asked to start from a text-tower checkpoint
    text = train_run(args, tmp_path, "text", "train.epochs=1")
    capsys.readouterr()
    err = one_line_error(capsys, "train", *args, *SEQ, f"model.init_from={text}", "tracking.run_name=s")
    assert "has a text user tower" in err and "sequence" in err
    assert not (tmp_path / "results" / "runs" / "s").exists()
    err = one_line_error(capsys, "train", *args, *SEQ, "model.item_space=hidden",
                         "model.sequence_readout=mean_residual")
    assert "item_space=hidden" in err and "sequence_readout=last" in err
    err = one_line_error(capsys, "train", *args, *SEQ, "model.item_space=width")
    assert "item_space must be one of item, hidden" in err
    err = one_line_error(capsys, "train", *args, *SEQ, "compress.precision=int8")
    assert "fp32" in err
    err = one_line_error(capsys, "export", str(text.parent / "no-such-run"))
    assert "not found" in err


def test_sequence_tower_reads_a_text_runs_item_tower(tmp_path, tiny_model, capsys):
    """model.item_tower_from: the text two-tower's fine-tuned item tower under a sequence user tower (frozen): its
    weights, hence its item vectors, are the text run's; a mismatched item encoding is one line."""
    from recsys.runs import load_run

    args = tiny_run_args(tiny_model, tmp_path)
    text = train_run(args, tmp_path, "text", "train.epochs=1")
    seq = train_run(args, tmp_path, "seq", *SEQ, "model.freeze_item_tower=true", f"model.item_tower_from={text}")
    _, a = load_run(text)
    _, b = load_run(seq)
    item_a, item_b = a.item_tower.state_dict(), b.item_tower.state_dict()
    assert item_a.keys() == item_b.keys() and all(torch.equal(item_a[k], item_b[k]) for k in item_a)
    from recsys.models.two_tower import build_tower
    fresh = build_tower(tiny_model, b.model_cfg).state_dict()  # what it would have read without the key
    assert not torch.equal(fresh["encoder.layers.0.ffn.up.weight"], item_b["encoder.layers.0.ffn.up.weight"])
    capsys.readouterr()
    err = one_line_error(capsys, "train", *args, *SEQ, f"model.item_tower_from={text}", "data.item_max_tokens=8",
                         "tracking.run_name=bad")
    assert "encodes items with" in err and "data.item_max_tokens=16" in err
    assert not (tmp_path / "results" / "runs" / "bad").exists()
    err = one_line_error(capsys, "train", *args, f"model.item_tower_from={text}")  # one shared text encoder
    assert "model.item_tower_from" in err and "shared" in err


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_sequence_run_exports_for_serving(tmp_path, tiny_model, capsys, fmt):
    """`recsys export` of a gated sequence run: the materialized tower, the item tower and the catalog vectors;
    the exported tower, run by ONNX Runtime / torch.export on a history looked up in the exported catalog, gives the
    run's user embedding and ranks the catalog as the run does."""
    pytest.importorskip("onnxruntime")
    from recsys.models.sequence_tower import lookup, recent_items
    from recsys.runs import load_run
    from recsys.serving.export import run_exported_sequence

    args = tiny_run_args(tiny_model, tmp_path)
    run = train_run(args, tmp_path, "seq", *SEQ, "model.freeze_item_tower=true", "model.sequence_adaptor=true",
                    "compress.gates=[heads, ffn]", "compress.lambda_flops=1.0")
    assert main(["export", str(run), "--format", fmt]) == 0
    out = run / "export" / fmt
    report = json.loads((out / "export.json").read_text())
    assert report["user_tower"] == "sequence" and report["towers"]["user"]["max_abs_diff"] <= 1e-4
    items, keys = np.load(out / "catalog_items.npy"), np.load(out / "catalog_keys.npy")
    assert items.shape == (150, 32) and keys.shape == items.shape and len(json.loads((out / "item_ids.json")
                                                                                      .read_text())) == 150
    _, module = load_run(run)
    history = recent_items([np.array([3, 1, 4])], module.user_tower.n_items)  # [1, N], left-padded
    vectors, mask = lookup(history, torch.from_numpy(items))
    got = run_exported_sequence(out / "user", fmt, vectors, mask.long())
    with torch.inference_mode():
        ref = module.user_tower(vectors, mask)
        run_keys = module.user_tower.represent(torch.from_numpy(items))
    assert torch.allclose(got, ref, atol=1e-4) and torch.allclose(torch.from_numpy(keys), run_keys)
    assert (torch.from_numpy(keys) @ got[0]).topk(10).indices.tolist() == (run_keys @ ref[0]).topk(10).indices.tolist()
    err = one_line_error(capsys, "export", str(run), "--format", "hf")
    assert "sequence user tower" in err and "--format onnx" in err


def test_sequence_config_is_described_and_validated():
    from recsys.config import describe, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "ml100k_sequence.yaml")
    assert cfg.model.user_tower == "sequence" and cfg.model.freeze_item_tower
    text = describe(cfg)
    assert "user_tower: sequence" in text and "sasrec:" in text
    with pytest.raises(Exception, match="user_tower must be one of text, sequence"):
        load_config(None, ["model.user_tower=seq"])
    hidden = load_config(Path(__file__).resolve().parents[1] / "configs" / "sequence_hidden.yaml").model
    assert (hidden.item_space, hidden.sequence_readout, hidden.sequence_score) == ("hidden", "last", "dot")


# --- the benchmark and its figure -----------------------------------------------------------------------------


def _user_towers_fixture() -> dict:
    def row(name, ndcg, ms, seeds=3):
        return {"name": name, "ndcg@10": ndcg, "recall@10": 2 * ndcg, "n_seeds": seeds, "train_minutes": 1.0,
                "measured_ms_median": ms}
    return {"dataset": "ml-100k", "rows": [row("text_two_tower", 0.073, 27.0), row("sequence_tower", 0.07, 0.9),
                                           row("sasrec", 0.06, 0.5), row("ease", 0.071, 0.3, 1)],
            "bar": {"speedup_vs_text": 30.0, "ndcg_vs_text": 0.96}, "aim": {"best": "text_two_tower", "vs_ease": 1.03}}


def test_user_towers_notebook_draws_the_front(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    from recsys.tracking.schemas import problems

    data = _user_towers_fixture()
    assert problems("ml100k_user_towers.json", data) == [] and problems("ml1m_user_towers.json", {}) != []
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "ml100k_user_towers.json").write_text(json.dumps(data))
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    nb = nbformat.read(notebooks / "user_towers.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=HANG_S, resources={"metadata": {"path": str(notebooks)}}).execute(
        env={**__import__("os").environ, "RECSYS_RESULTS": str(tmp_path)})
    png = tmp_path / "figures" / "user_towers.png"
    assert png.is_file() and png.stat().st_size > 10_000
    html = next(o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if "text/html" in o.get("data", {}))
    assert all(r["name"] in html for r in data["rows"])


@pytest.mark.slow
def test_user_towers_benchmark_smoke_resumes(tmp_path, tiny_model):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "experiments/user_towers.py", "--smoke", "--dataset", "synthetic", "--encoder",
           tiny_model, "--results", str(tmp_path), "--seeds", "0,1", "--rounds", "2"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, timeout=HANG_S)
    assert first.returncode == 0, first.stderr[-2000:]
    out = json.loads((tmp_path / "benchmarks" / "synthetic_user_towers.json").read_text())
    names = {r["name"] for r in out["rows"]}
    assert names == {"ease", "sasrec", "sequence_tower", "text_two_tower"}
    assert all(r["measured_ms_median"] > 0 and r["n_seeds"] >= 1 for r in out["rows"])
    assert out["bar"]["speedup_vs_text"] > 0 and "git" in out
    again = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, timeout=HANG_S)
    assert again.returncode == 0 and "== training" not in again.stdout and "== sasrec" not in again.stdout
