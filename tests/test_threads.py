"""train.threads: the torch intra-op threads a run trains and is evaluated with (default 1), recorded in the run's
record.json, restored afterwards."""
from __future__ import annotations

import json

import torch

from recsys.cli import main


def test_a_run_trains_with_train_threads_and_records_it(small_synthetic_args, tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["train", *small_synthetic_args, "train.epochs=1"]) == 0
        record = json.loads((tmp_path / "results" / "runs" / "t" / "record.json").read_text())
        assert record["hardware"]["torch_threads"] == 1  # the default, whatever the process had
        assert torch.get_num_threads() == 2  # restored
        assert main(["train", *small_synthetic_args, "train.epochs=1", "train.threads=2",
                     "tracking.run_name=t2"]) == 0
        record = json.loads((tmp_path / "results" / "runs" / "t2" / "record.json").read_text())
        assert record["hardware"]["torch_threads"] == 2
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main(["train", *small_synthetic_args, "train.threads=0"]) == 2
    assert "train.threads must be > 0, got 0" in capsys.readouterr().err
