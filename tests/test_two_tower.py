"""The two-tower end to end with a tiny real BERT and a real Lightning Trainer on small synthetic data."""
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import HANG_S

from recsys.cli import main
from recsys.config import load_config
from recsys.data.split import leave_last_out
from recsys.data.synthetic import generate
from recsys.models.datamodule import RecDataModule
from recsys.recipes.evaluate import evaluate_run


@pytest.fixture
def trained_run(small_synthetic_args, tmp_path, capsys):
    assert main(["train", *small_synthetic_args]) == 0
    out = capsys.readouterr().out
    return tmp_path / "results" / "runs" / "t", out


def test_train_writes_a_complete_run_and_evaluate_reproduces_it(trained_run):
    run, printed = trained_run
    assert "two_tower" in printed and "ndcg@10" in printed
    for f in ("config.yaml", "metrics.json", "per_user_test.csv", "per_user_val.csv", "record.json",
              "checkpoints/best.ckpt", "log/metrics.csv"):
        assert (run / f).is_file(), f
    assert not list(run.parent.glob("*.partial"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluated_users"] == 120 and 0 <= metrics["test"]["ndcg@10"] <= 1
    assert metrics["steps"] > 0 and metrics["train_examples_per_s"] > 0
    record = json.loads((run / "record.json").read_text())
    assert record["hardware"]["cpu"] and "torch" in record["versions"] and "commit" in record["git"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["synthetic_users"] == 120 and resolved["train"]["epochs"] == 2
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)  # no pickled objects
    assert "state_dict" in state
    again = evaluate_run(run, "test", progress=False)
    assert again.metrics["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-6)
    val = evaluate_run(run / "checkpoints" / "best.ckpt", "val", progress=False)
    assert val.metrics["ndcg@10"] == pytest.approx(metrics["val"]["ndcg@10"], abs=1e-6)
    assert metrics["best_val_ndcg@10"] == pytest.approx(metrics["val"]["ndcg@10"], abs=1e-6)


def test_evaluate_compare_prints_paired_test(trained_run, capsys):
    run, _ = trained_run
    assert main(["evaluate", str(run), "--compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert "+0.0000" in out and "bootstrap CI" in out


def test_training_improves_on_the_untrained_tiny_model(small_synthetic_args, tmp_path):
    """Fitting must learn something: val NDCG@10 after training beats the same tiny model untrained."""
    from dataclasses import asdict

    from recsys.models.encoder import load_tokenizer
    from recsys.models.two_tower import TwoTowerModule
    from recsys.recipes.evaluate import evaluate_module
    from recsys.recipes.train import train

    cfg = load_config(None, small_synthetic_args + ["train.epochs=4", "train.examples_per_user=8"])
    torch.manual_seed(0)
    fresh = TwoTowerModule(model=asdict(cfg.model), train=asdict(cfg.train))
    ds = generate(seed=0, n_users=120, n_items=150)
    dm = RecDataModule(ds, leave_last_out(ds), load_tokenizer(cfg.model.encoder), cfg.data, cfg.train)
    before = evaluate_module(fresh, dm, ("val",), progress=False)["val"].metrics["ndcg@10"]
    after = train(cfg)["val"]["ndcg@10"]
    assert after > before + 0.02, (before, after)


def test_false_negative_mask_and_per_user_cap(tiny_model):
    from recsys.config import DataConfig, TrainConfig
    from recsys.models.encoder import load_tokenizer

    ds = generate(seed=0, n_users=50, n_items=60)
    split = leave_last_out(ds)
    train_cfg = TrainConfig(batch_size=8, examples_per_user=3, extra_negatives=4)
    dm = RecDataModule(ds, split, load_tokenizer(tiny_model), DataConfig(), train_cfg)
    ex = dm.examples(0)
    per_user = np.bincount([u for u, _ in ex], minlength=split.n_users)
    expected = [min(3, max(0, len(s) - 1)) for s in split.train]
    assert per_user.tolist() == expected
    assert dm.examples(0) == ex and dm.examples(1) != ex  # seeded, fresh draw per epoch
    batch = dm.collate_train(ex[:8])
    fn = batch["false_negatives"]
    assert fn.shape == (8, 12) and batch["item"]["input_ids"].shape[0] == 12
    for b, (u, t) in enumerate(ex[:8]):
        target = split.train[u][t]
        assert fn[b, b]  # own positive is flagged (the loss keeps it on the diagonal)
        for j in range(8):
            other = split.train[ex[j][0]][ex[j][1]]
            assert fn[b, j] == (other in set(split.train[u].tolist()) or other == target)


def test_wandb_offline_runs_land_in_their_own_run_folders(small_synthetic_args, tmp_path, monkeypatch):
    """Offline W&B (no key, no network): each run keeps its own offline run, also when two run in one process."""
    from recsys.recipes.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    base = small_synthetic_args + ["train.epochs=1", "tracking.wandb=offline"]
    for name in ("a", "b"):
        train(load_config(None, base + [f"tracking.run_name={name}"]))
    for name in ("a", "b"):
        runs = list((tmp_path / "results" / "runs" / name / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, name


def test_offline_training_after_a_wandb_summary_in_the_same_process(small_synthetic_args, tmp_path):
    """No $WANDB_MODE and no key: a sweep writes its W&B summary, then trains more trials in the same process
    (the λ study, then the post-hoc one). wandb reads the mode once per process; the trials must stay offline."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    script = (
        "import json, sys, types\n"
        "from recsys.config import TrackingConfig, load_config\n"
        "from recsys.search.report import _wandb_summary\n"
        "from recsys.recipes.train import train\n"
        f"_wandb_summary(types.SimpleNamespace(study='s', folder={str(tmp_path)!r}), [{{'trial': 0}}], "
        "TrackingConfig())\n"
        f"train(load_config(None, json.loads({json.dumps(json.dumps(small_synthetic_args))}) + "
        "['train.epochs=1', 'tracking.wandb=offline']))\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=HANG_S,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert list((tmp_path / "results" / "runs" / "t" / "wandb").glob("offline-run-*"))
