"""Two-process DDP training on CPU (gloo, 127.0.0.1) through the real CLI, as a subprocess."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    assert "sync_dist=True" not in proc.stderr  # validation metrics are gathered before they are logged
    assert "error:" not in proc.stderr  # rank 1 ending when the run is done is not reported as a death


def _ddp_env() -> dict:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WANDB_MODE": "disabled",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _child_rank_pid(parent: int) -> int:
    """The pid of rank 1: the child process Lightning started with LOCAL_RANK=1."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent and \
                    b"LOCAL_RANK=1" in (stat.parent / "environ").read_bytes().split(b"\0"):
                return int(stat.parent.name)
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError("no rank 1 process")


def _training(small_synthetic_args, tmp_path):
    """A 2-process DDP run that trains until it is stopped; returns once both ranks have stepped together (rank 0
    wrote its first full-state checkpoint: an event of the run, not a duration)."""
    cmd = [sys.executable, "-m", "recsys.cli", "train", *small_synthetic_args, "train.strategy=ddp",
           "train.devices=2", "train.accelerator=cpu", "train.epochs=100000", "train.checkpoint_every_steps=1"]
    proc = subprocess.Popen(cmd, env=_ddp_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "results" / "runs" / "t.partial" / "checkpoints" / "last.ckpt"
    while not ckpt.is_file():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    return proc


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.multiprocess
@pytest.mark.parametrize("killed", [1, 0], ids=["rank1", "rank0"])
def test_a_killed_rank_is_one_line_naming_it(small_synthetic_args, tmp_path, killed):
    """SIGKILL one rank of a training DDP run: the other exits non-zero with one line naming the rank that died
    (no gloo traceback), and no process is left."""
    proc = _training(small_synthetic_args, tmp_path)
    child = _child_rank_pid(proc.pid)
    os.kill(child if killed == 1 else proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=HANG_S)  # rank 0's pipes stay open until rank 1 has ended too
    assert proc.returncode != 0
    lines = _error_lines(err)
    assert len(lines) == 1, err[-3000:]
    if killed == 1:
        assert f"DDP rank 1 (pid {child}) died (killed by SIGKILL)" in lines[0]
    else:
        assert "DDP rank 0 died; rank 1" in lines[0]
    deadline = time.monotonic() + HANG_S  # a hang guard: the other rank ends (it was not left running)
    while _running(child):
        assert time.monotonic() < deadline, f"rank pid {child} still running"
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_rank_zeros_failure_line_names_a_child_that_died_before_its_collective_failed():
    """Rank 0's collective fails after a child rank was SIGKILLed: the child is a zombie by then, whose /proc environ
    reads empty, so its rank comes from what the watch saw while it was alive — the line names it and how it died."""
    from recsys.recipes import ranks

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             env={**os.environ, "LOCAL_RANK": "1"})
    stop = ranks.watch_ranks(interval=0.05)
    try:
        deadline = time.monotonic() + HANG_S  # a hang guard: the watch sees the child (an event, not a duration)
        while ranks._known.get(child.pid) != 1:
            assert time.monotonic() < deadline, "the watch never saw the child rank"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        while _running(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        line = ranks.rank_failure(RuntimeError("[gloo] Connection closed by peer"))
        assert line == f"DDP rank 1 (pid {child.pid}) died (killed by SIGKILL); the run stops"
    finally:
        stop.set()
        child.kill()
        child.wait()
