"""`recsys train --resume`: a fit that crashed mid-epoch keeps its last full-state checkpoint (and config) in
`<run>.partial/`, nothing else; resuming continues from it — the epoch's remaining batches in their original order,
optimizer and schedule restored — and ends where an uninterrupted run with the same seed ends."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import tiny_run_args

from recsys.cli import main
from recsys.config import load_config
from recsys.errors import RecsysError
from recsys.recipes.train import train
from recsys.runs import load_run


class Crash(pl.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"crash at step {self.at_step}")


def test_a_crashed_run_resumes_mid_epoch_and_ends_as_an_uninterrupted_one(tmp_path, tiny_model, capsys):
    # dropout 0: the one random draw of a dense fit that a checkpoint does not carry
    over = [*tiny_run_args(tiny_model, tmp_path), "model.dropout=0.0", "train.checkpoint_every_steps=3",
            "train.epochs=2"]
    straight = train(load_config(None, [*over, "tracking.run_name=straight"]))
    assert straight["steps"] == 16  # 2 epochs of 8 batches: the crash below (step 7, last checkpoint 6) is mid-epoch
    cfg = load_config(None, [*over, "tracking.run_name=crashed"])
    with pytest.raises(RuntimeError, match="crash at step 7"):
        train(cfg, callbacks=[Crash(7)])
    partial = tmp_path / "results" / "runs" / "crashed.partial"
    assert sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file()) == \
        ["checkpoints/last.ckpt", "config.yaml"]
    assert not (tmp_path / "results" / "runs" / "crashed").exists()
    with pytest.raises(RecsysError, match="--resume to continue it"):  # starting again would destroy it
        train(cfg)
    with pytest.raises(RecsysError, match="config differs"):
        train(load_config(None, [*over, "tracking.run_name=crashed", "train.lr=0.5"]), resume=True)
    resumed = train(cfg, resume=True)
    assert resumed["steps"] == 16 and not partial.exists()
    assert not (tmp_path / "results" / "runs" / "crashed" / "checkpoints" / "last.ckpt").exists()
    for stage in ("val", "test"):
        for k, v in straight[stage].items():
            assert resumed[stage][k] == pytest.approx(v, abs=1e-6), (stage, k)
    a, b = load_run(straight["run_dir"])[1].state_dict(), load_run(resumed["run_dir"])[1].state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_resume_without_an_interrupted_run_is_one_line(tmp_path, tiny_model, capsys):
    args = [*tiny_run_args(tiny_model, tmp_path), "tracking.run_name=none"]
    assert main(["train", "--resume", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no interrupted run none to continue" in err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*"))


def test_a_benchmark_run_that_crashed_continues_from_its_checkpoint(tmp_path, tiny_model):
    """`experiments/common.train_or_reuse` (every benchmark's runs): a run stopped mid-fit with a full-state
    checkpoint continues from it instead of refusing (or starting again), and ends as an uninterrupted one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from common import train_or_reuse

    results = tmp_path / "results"
    over = [*tiny_run_args(tiny_model, tmp_path), "model.dropout=0.0", "train.checkpoint_every_steps=3",
            "train.epochs=2"]
    straight = train_or_reuse(None, over, "straight", results)
    with pytest.raises(RuntimeError, match="crash at step 7"):
        train(load_config(None, [*over, f"tracking.results_dir={results}", "tracking.run_name=piece",
                                 "tracking.progress_bar=false"]), callbacks=[Crash(7)])
    assert (results / "runs" / "piece.partial" / "checkpoints" / "last.ckpt").is_file()
    run = train_or_reuse(None, over, "piece", results)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (straight, run))
    assert b["steps"] == a["steps"] == 16 and not (results / "runs" / "piece.partial").exists()
    assert b["test"]["ndcg@10"] == pytest.approx(a["test"]["ndcg@10"], abs=1e-6)
