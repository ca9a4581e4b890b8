"""The end of `make demo` (experiments/demo_tradeoff.py) on a tiny BERT: dense, pruned and int8 rows, each
evaluated as served and timed, the table printed and the figure written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import HANG_S, tiny_run_args

from recsys.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_demo_ends_with_the_tradeoff_table(tmp_path, tiny_model):
    args = [*tiny_run_args(tiny_model, tmp_path), "train.epochs=1", "tracking.run_name=demo"]
    assert main(["train", "--config", "configs/synthetic.yaml", *args]) == 0
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "experiments/demo_tradeoff.py", "--out", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=HANG_S, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "tradeoff.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["dense fp32", "pruned 50% fp32", "dense int8 (PTQ)", "pruned 50% int8"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["% of dense"] == 100.0
    assert all(0 <= r["ndcg@10"] <= 1 and r["ms"] > 0 for r in rows)
    shape = json.loads((tmp_path / "results" / "runs" / "demo-pruned" / "metrics.json").read_text())["structure"]
    assert sum(len(layer["heads"]) for layer in shape["user_shape"]["layers"]) == 4  # half of 2 × 4 heads
    assert "| model | ndcg@10 |" in proc.stdout and (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
