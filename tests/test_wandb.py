"""W&B, offline and real: a run's summary holds its final metrics, structure report, measured online latency and
resolved config; a sweep's summary run goes to the project the config names. Read back from the files W&B writes
(no key, no network)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from recsys.cli import main

GATES = ["compress.gates=[heads,ffn]", "compress.budget_metric=flops", "compress.budget_target=0.8",
         "compress.gate_lr=0.5"]


def wandb_records(path: Path):
    """The records of a W&B run file (`run-<id>.wandb`): a 7-byte W&B header, then LevelDB-log framing (32 KiB
    blocks; 7-byte record headers: CRC, length, FULL/FIRST/MIDDLE/LAST), each record a wandb_internal_pb2.Record.
    wandb ≥ 0.19 writes offline runs only there (no wandb-summary.json until they are synced)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec
    assert pending == b"", f"{path}: ends inside a record (read before W&B closed it?)"


def offline_run(folder: Path) -> tuple[dict, dict]:
    """(summary, run facts: project, group, job type) of the one offline W&B run under `folder`.

    W&B's service process writes the file and closes it after `run.finish()` has returned (finish only informs
    it), so the file is read once `wandb.teardown()` has waited for that process to exit: every run flushed and
    closed, whatever the machine's load."""
    import wandb

    wandb.teardown()
    (path,) = folder.rglob("run-*.wandb")
    summary, run = {}, {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "run":
            run = {"project": rec.run.project, "group": rec.run.run_group, "job_type": rec.run.job_type}
    return summary, run


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_a_run_summary_has_metrics_structure_latency_and_config(offline, small_synthetic_args, tmp_path):
    args = [a for a in small_synthetic_args if a != "tracking.wandb=disabled"]
    assert main(["train", *args, *GATES]) == 0
    run = tmp_path / "results" / "runs" / "t"
    metrics = json.loads((run / "metrics.json").read_text())
    s, facts = offline_run(run / "wandb")
    assert facts["project"] == "recsys"
    assert s["final/test/ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"])
    assert s["final/val/recall@10"] == pytest.approx(metrics["val"]["recall@10"])
    assert s["online_latency_ms/median"] == pytest.approx(metrics["online_latency_ms"]["median"])
    assert metrics["online_latency_ms"]["median"] > 0
    assert s["structure/user_ratio/flops"] == pytest.approx(metrics["structure"]["user_ratios"]["flops"])
    assert s["structure/budget/met"] == metrics["structure"]["budget"]["met"]
    assert s["config"]["compress"]["budget_target"] == 0.8 and s["config"]["tracking"]["run_name"] == "t"


def test_sweep_summary_goes_to_the_configured_project(offline, tmp_path, tiny_model):
    from conftest import tiny_run_args

    base = tmp_path / "base.yaml"
    base.write_text("# base of a test sweep (recsys sweep)\ndata:\n  name: synthetic\n")
    over = [a for a in tiny_run_args(tiny_model, tmp_path) if a != "tracking.wandb=disabled"]
    over += ["train.epochs=1", "tracking.wandb_project=my-project", "compress.gates=[heads]"]
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("\n".join([f"study: proj\nbase_config: {base}\nresults_dir: {tmp_path / 'results'}",
                              "objectives: [ndcg@10, params]\nsampler: random\nn_trials: 1\noverrides:",
                              *[f"  - {o}" for o in over],
                              "params:\n  compress.lambda_params: {low: 0.01, high: 1.0}"]) + "\n")
    assert main(["sweep", "--config", str(cfg)]) == 0
    folder = tmp_path / "results" / "sweeps" / "proj"
    summary, facts = offline_run(folder / "wandb")  # the study's summary run, beside its trial runs
    assert facts == {"project": "my-project", "group": "proj", "job_type": "sweep-summary"}
    _, trial = offline_run(folder / "runs" / "trial-0000")
    assert trial["project"] == "my-project" and trial["group"] == "proj"
