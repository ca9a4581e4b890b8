"""Latency harness: statistics, interleaving, the cross-process lock, and real tower/retrieval timings."""
import multiprocessing as mp
import time

import pytest
import torch

from recsys.efficiency import latency
from recsys.efficiency.latency import Timing, exclusive, interleaved, measure
from recsys.efficiency.shape import LayerShape, Shape
from recsys.models.encoder import BertEncoder
from recsys.models.tower import Tower
from recsys.serving.routes import online_latency


def test_timing_percentiles():
    t = Timing(list(range(1, 101)))
    assert t.p50 == pytest.approx(50.5) and t.p90 == pytest.approx(90.1) and t.p99 == pytest.approx(99.01)


def test_measure_and_interleaved_order_by_cost():
    slow, fast = (lambda: time.sleep(0.004)), (lambda: time.sleep(0.001))
    t = measure(fast, warmup=1, min_repeats=5, min_seconds=0.0)
    assert len(t.samples_ms) == 5 and t.p50 >= 1.0
    both = interleaved({"slow": slow, "fast": fast}, rounds=3, per_round=2, warmup=1)
    assert len(both["slow"].samples_ms) == 6 and both["slow"].p50 > both["fast"].p50


def _hold(path, started, seconds):
    with exclusive(path):
        started.set()
        time.sleep(seconds)


def test_lock_serialises_processes(tmp_path):
    path = tmp_path / "lock"
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_hold, args=(path, started, 1.5))
    p.start()
    assert started.wait(60)
    t = time.perf_counter()
    with exclusive(path):
        waited = time.perf_counter() - t
    p.join()
    assert waited > 0.5


def test_online_latency_of_a_tiny_tower():
    shape = Shape(layers=(LayerShape((0, 1), 32),) * 2, hidden=32, head_dim=16, n_heads_dense=2, ffn_dense=32,
                  vocab_size=30522, max_positions=64, type_vocab_size=2)
    tower = Tower(BertEncoder(shape), 32)
    out = online_latency(tower, seq_len=16, n_items=5000, min_seconds=0.1)
    assert set(out) == {"user_tower", "retrieval", "online"}
    assert all(v["median_ms"] > 0 and v["p99_ms"] >= v["median_ms"] for v in out.values())
    assert latency.environment()["threads"] == torch.get_num_threads()
