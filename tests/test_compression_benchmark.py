"""experiments/ml100k_compression.py end to end on a tiny BERT and synthetic data (one seed): every run trains,
every row is evaluated with the model it serves and measured, and the JSON has the issue's rows — so the
three-hour benchmark cannot fail at its last step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_S, tiny_run_args

from recsys.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compression_benchmark_end_to_end(tmp_path, tiny_model):
    args = [*tiny_run_args(tiny_model, tmp_path), "data.name=synthetic", "train.epochs=1"]
    assert main(["train", "--config", "configs/ml100k.yaml", *args, "tracking.run_name=dense-seed0"]) == 0
    out = tmp_path / "compression.json"
    cmd = [sys.executable, "experiments/ml100k_compression.py", "--seeds", "0", "--student-layers", "0",
           "--dense", str(tmp_path / "results" / "runs" / "dense-seed{seed}"), "--out", str(out), *args,
           "compress.ffn_group=8"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["dense_fp32", "dense_bf16", "ptq_int8", "ft_fp32", "qat_int8", "student_nodistill",
                     "student_distill", "stacked"]
    rows = {r["name"]: r for r in res["rows"]}
    for r in res["rows"]:
        assert 0 <= r["ndcg@10"] <= 1 and r["measured_ms_median"] > 0 and r["seeds"] == [0]
        assert r["speedup"] == rows["dense_fp32"]["measured_ms_median"] / r["measured_ms_median"]
    assert rows["dense_fp32"]["speedup"] == 1.0
    assert rows["qat_int8"]["precision"] == "int8" and rows["dense_bf16"]["precision"] == "bf16"
    assert set(res["dense_routes"]) == {"fp32", "fp32-compile", "ort-fp32"}
    assert res["best_fp32_ms"] == min(t["median_ms"] for t in res["dense_routes"].values())
    assert "pooled_over_seeds" in res["distill_vs_nodistill"]
    runs = tmp_path / "results" / "runs"
    assert (runs / "stacked-onnxruntime-seed0" / "metrics.json").is_file()
    # resumable: a second call reuses every finished run (no "== training" line)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_S, env=env)
    assert again.returncode == 0 and "== training" not in again.stdout
