"""Two-process DDP training on CPU (gloo, 127.0.0.1) through the real CLI, as a subprocess."""
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import HANG_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_ddp_two_processes_write_one_complete_run(small_synthetic_args, tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recsys.cli", "train", *small_synthetic_args, "train.strategy=ddp",
           "train.devices=2", "train.accelerator=cpu", "train.epochs=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = tmp_path / "results" / "runs"
    assert [p.name for p in runs.iterdir()] == ["t"]
    metrics = json.loads((runs / "t" / "metrics.json").read_text())
    assert metrics["evaluated_users"] == 120  # every user once, although each rank validated half of them
    assert proc.stdout.count("two_tower") == 1  # rank 0 alone reports
