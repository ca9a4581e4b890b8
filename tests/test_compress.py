"""End to end: λ-penalised and budget-mode training with gates, the structure report, export in every format."""
import json

import pytest
import torch
from conftest import tiny_run_args, train_run

from recsys.cli import main
from recsys.models.encoder import load_tokenizer
from recsys.models.tower import tokenize
from recsys.serving.export import load_tower, run_exported

GATES = "compress.gates=[heads,ffn,blocks,output]"


@pytest.fixture(scope="module")
def penalised_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("penalised")
    args = tiny_run_args(tiny_model, tmp)
    run = train_run(args, tmp, "lam", GATES, "model.projection_dim=16", "compress.lambda_flops=3.0",
                 "compress.lambda_latency=1.0", "compress.gate_lr=0.5")
    return run, args, tmp


def test_penalties_shrink_the_model_and_are_reported(penalised_run):
    run, _, _ = penalised_run
    m = json.loads((run / "metrics.json").read_text())
    s = m["structure"]
    assert set(s["user_ratios"]) == {"params", "flops", "latency"}
    assert s["user_ratios"]["flops"] < 0.9  # gates closed under the FLOPs/latency penalty
    shape = s["user_shape"]
    kept = sum(len(layer["heads"]) for layer in shape["layers"]), sum(layer["ffn"] for layer in shape["layers"])
    assert kept[0] < 8 or kept[1] < 128 or shape["output_dim"] < 16
    assert 0 <= m["test"]["ndcg@10"] <= 1
    assert m["best_val_ndcg@10"] is None  # a gated run keeps its final model, not a monitored best


def test_budget_mode_reports_its_outcome(penalised_run):
    _, args, tmp = penalised_run
    run = train_run(args, tmp, "budget", GATES, "model.projection_dim=16", "compress.budget_metric=params",
                 "compress.budget_target=0.9", "compress.budget_warmup=0.3", "compress.gate_lr=0.5",
                 "compress.lagrangian_lr=0.5")
    b = json.loads((run / "metrics.json").read_text())["structure"]["budget"]
    assert b["metric"] == "params" and b["target"] == 0.9
    assert b["met"] == (b["achieved"] <= b["target"] + b["tolerance"])
    assert b["achieved"] < 1.0  # the Lagrangian pulled the parameter count down from dense


@pytest.mark.parametrize("fmt", ["hf", "torch-export", "onnx"])
def test_export_formats_reproduce_the_gated_embeddings(penalised_run, tiny_model, fmt, tmp_path):
    run, _, _ = penalised_run
    out = tmp_path / fmt
    assert main(["export", str(run), "--format", fmt, "--output", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    user = report["towers"]["user"]
    assert user["max_abs_diff"] <= 1e-4
    # independently of export_run's own check: the artifact against the run's materialized tower
    from recsys.runs import load_run
    from recsys.serving.materialize import materialize
    _, module = load_run(run)
    compact = materialize(module.user_tower)
    tok = load_tokenizer(tiny_model)
    batch = tokenize(tok, ["toy story. genres: animation", "heat. genres: action, crime, thriller"], 32)
    with torch.inference_mode():
        ref = compact(**batch)
    got = run_exported(out / "user", user["written_format"], batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(got, ref, atol=1e-4)
    assert sum(p.numel() for p in compact.parameters()) == user["params"]


def test_hf_export_loads_with_plain_automodel(penalised_run, tmp_path):
    """With only output-dim gates the compact encoder is a plain BERT: AutoModel loads it."""
    _, args, tmp = penalised_run
    run = train_run(args, tmp, "outonly", "compress.gates=[output]", "compress.lambda_params=1.0",
                 "compress.gate_lr=0.5")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--output", str(out)]) == 0
    assert json.loads((out / "export.json").read_text())["towers"]["user"]["written_format"] == "hf"
    from transformers import AutoModel, AutoTokenizer
    hf = AutoModel.from_pretrained(out / "user").eval()
    tok = AutoTokenizer.from_pretrained(out / "user")
    batch = tok(["toy story. genres: animation"], return_tensors="pt")
    tower = load_tower(out / "user")
    with torch.inference_mode():
        ours = tower.encoder(batch["input_ids"], batch["attention_mask"])
        theirs = hf(**batch).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_export_bad_input(penalised_run, small_synthetic_args, tmp_path, capsys):
    run, _, _ = penalised_run
    assert main(["train", *small_synthetic_args, "train.epochs=1"]) == 0
    dense = tmp_path / "results" / "runs" / "t"
    assert main(["export", str(dense)]) == 2
    assert "has no gates to materialize" in capsys.readouterr().err
    assert not (dense / "export").exists()
    assert main(["export", str(run), "--format", "tflite"]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "run not found" in capsys.readouterr().err


def test_posthoc_pruning_then_frozen_recovery(penalised_run, tiny_model):
    """compress.prune_ratio prunes the dense run by importance once, then trains with the structure fixed."""
    _, args, tmp = penalised_run
    dense = train_run(args, tmp, "dense")
    run = train_run(args, tmp, "posthoc", f"model.init_from={dense}", "compress.gates=[heads,ffn]",
                 "compress.ffn_group=8", "compress.prune_ratio=0.5", "compress.prune_batches=2")
    shape = json.loads((run / "metrics.json").read_text())["structure"]["user_shape"]
    assert sum(len(layer["heads"]) for layer in shape["layers"]) == 4  # half of 2 × 4 heads
    assert sum(layer["ffn"] for layer in shape["layers"]) == 64  # half of 2 × 64 neurons, in groups of 8
    # the structure stayed fixed while training: every gate is still at ±10
    from recsys.runs import load_run
    _, module = load_run(run)
    assert module.user_tower.gates.heads.log_alpha.abs().eq(10).all()
    # recovery of a gated run: init_from + freeze_gates keeps its hard shape
    again = train_run(args, tmp, "recover", f"model.init_from={run}", "compress.gates=[heads,ffn]",
                   "compress.ffn_group=8", "compress.freeze_gates=true")
    assert json.loads((again / "metrics.json").read_text())["structure"]["user_shape"] == shape


def test_importance_ranks_units_and_keep_mask_is_global():
    from recsys.models.importance import keep_mask

    scores = torch.tensor([[5.0, 1.0, 3.0], [0.5, 4.0, 2.0]])
    assert keep_mask(scores, 0.5).tolist() == [[True, False, True], [False, True, False]]
    assert keep_mask(scores, 0.99).sum() == 1  # at least one unit stays


def test_in_run_recovery_fixes_the_structure_for_the_last_part_of_training(penalised_run):
    """compress.recovery=0.5: the gates learn over the first half, then stay exactly as they are."""
    import pytorch_lightning as pl

    from recsys.config import load_config
    from recsys.recipes.train import train

    _, args, _ = penalised_run

    class Record(pl.Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            g = module.user_tower.gates
            self.steps.append((g.frozen, g.heads.log_alpha.detach().clone()))

    rec = Record()
    over = [a for a in args if not a.startswith("tracking.run_name")]
    train(load_config(None, over + [GATES, "compress.lambda_flops=3.0", "compress.gate_lr=0.5",
                                    "compress.recovery=0.5", "tracking.run_name=recovery"]), callbacks=[rec])
    frozen = [f for f, _ in rec.steps]
    first = frozen.index(True)
    assert 0 < first and all(frozen[first:]) and first == pytest.approx(len(frozen) / 2, abs=1)
    assert not torch.equal(rec.steps[0][1], rec.steps[first - 1][1])  # the gates moved while learning
    assert all(torch.equal(rec.steps[first][1], a) for _, a in rec.steps[first:])  # and not after


def _one_error(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_never_deletes_what_it_did_not_write(penalised_run, tmp_path, capsys):
    """`recsys export --output` onto a folder of someone else's files, onto the run folder (or a folder holding
    it), onto a file: refused in one line, everything left as it was, no `.partial` beside it. An earlier export is
    replaced only with --overwrite (and not when it holds a file the export did not write)."""
    run, _, _ = penalised_run
    notes = tmp_path / "notes"
    (notes / "MY_NOTES.txt").parent.mkdir()
    (notes / "MY_NOTES.txt").write_text("keep me")
    err = _one_error(capsys, "export", run, "--output", notes)
    assert "is not an export" in err and str(notes) in err
    assert _tree(notes) == {"MY_NOTES.txt": b"keep me"}
    before = _tree(run)
    for target in (run, run.parent):
        err = _one_error(capsys, "export", run, "--output", target)
        assert "is the run folder" in err
    assert _tree(run) == before
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"\0" * 10)
    err = _one_error(capsys, "export", run, "--output", a_file)
    assert "is not a folder" in err and a_file.read_bytes() == b"\0" * 10
    out = tmp_path / "export"
    assert main(["export", str(run), "--output", str(out)]) == 0
    first = _tree(out)
    assert set(json.loads(first["export.json"])["files"]) == set(first)
    capsys.readouterr()
    err = _one_error(capsys, "export", run, "--output", out)
    assert "--overwrite" in err and _tree(out) == first
    assert main(["export", str(run), "--output", str(out), "--overwrite"]) == 0
    assert set(_tree(out)) == set(first)
    capsys.readouterr()
    (out / "user" / "MY_NOTES.txt").write_text("mine")
    err = _one_error(capsys, "export", run, "--output", out, "--overwrite")
    assert "did not write" in err and "user/MY_NOTES.txt" in err and (out / "user" / "MY_NOTES.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "model.bin", "notes"]  # no .partial, no .lock
