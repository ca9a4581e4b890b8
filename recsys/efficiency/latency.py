"""The latency harness — one way to measure time, used everywhere.

Fixed thread count, warm-up, repeats until a time budget gives a stable median, p50/p90/p99, inputs at the
shape's sequence length, `torch.inference_mode`, and a record of hardware, threads, dtype and versions.
Measurements from parallel processes (sweep workers) are serialised by a file lock so they do not disturb
each other. Speed-up ratios come from `interleaved` (A, B, A, B … in one process): this machine drifts
10–20% between runs, so two separate runs are never compared.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from filelock import FileLock

from recsys.efficiency.device import synchronize
from recsys.tracking.records import hardware, versions

LOCK_PATH = Path(os.environ.get("RECSYS_LATENCY_LOCK", Path(tempfile.gettempdir()) / "recsys-latency.lock"))


@dataclass
class Timing:
    """Per-call wall times in milliseconds."""

    samples_ms: list[float] = field(repr=False)
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    mean: float = 0.0

    def __post_init__(self):
        a = np.asarray(self.samples_ms)
        self.p50, self.p90, self.p99 = (float(np.percentile(a, q)) for q in (50, 90, 99))
        self.mean = float(a.mean())

    def as_dict(self) -> dict:
        return {"median_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99, "mean_ms": self.mean,
                "repeats": len(self.samples_ms)}


@contextlib.contextmanager
def threads(n: int | None):
    """Run with `n` intra-op threads (None: leave as is)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def exclusive(lock_path: Path = LOCK_PATH, timeout: float = 3600):
    """Hold the machine-wide measurement lock (one measurement at a time across processes)."""
    with FileLock(str(lock_path), timeout=timeout):
        yield


def measure(fn: Callable[[], object], warmup: int = 3, min_repeats: int = 10, max_repeats: int = 1000,
            min_seconds: float = 1.0) -> Timing:
    """Time `fn()` after `warmup` calls, repeating until both `min_repeats` and `min_seconds` are reached (on a
    GPU each call is timed to the end of its kernels: `synchronize`)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples: list[float] = []
        synchronize()
        start = time.perf_counter()
        while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < min_seconds):
            t = time.perf_counter()
            fn()
            synchronize()
            samples.append((time.perf_counter() - t) * 1e3)
    return Timing(samples)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 10, per_round: int = 3,
                warmup: int = 3) -> dict[str, Timing]:
    """Time several functions alternately (A×k, B×k, A×k, …) so drift affects all of them equally."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        synchronize()
        for _ in range(rounds):
            for name, fn in fns.items():
                for _ in range(per_round):
                    t = time.perf_counter()
                    fn()
                    synchronize()
                    samples[name].append((time.perf_counter() - t) * 1e3)
    return {k: Timing(v) for k, v in samples.items()}


def tower_inputs(batch: int, seq_len: int, vocab_size: int = 30522, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids at exactly `seq_len` (no padding), as a user text truncated to the limit would be."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab_size, 30000), (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def user_tower_call(tower: torch.nn.Module, seq_len: int, batch: int = 1) -> Callable[[], torch.Tensor]:
    inputs = tower_inputs(batch, seq_len)
    tower.eval()
    return lambda: tower(**inputs)


def retrieval_call(n_items: int, dim: int, k: int = 10, seed: int = 0) -> Callable[[], torch.Tensor]:
    """Exact top-k scoring of one user against a catalog of `n_items` × `dim` (float32)."""
    g = torch.Generator().manual_seed(seed)
    items = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=g), dim=-1)
    user = torch.nn.functional.normalize(torch.randn(1, dim, generator=g), dim=-1)
    return lambda: torch.topk(user @ items.T, min(k, n_items)).indices


def item_throughput(tower: torch.nn.Module, batch: int = 64, seq_len: int = 24, n_threads: int | None = None,
                    min_seconds: float = 2.0) -> dict:
    """Items per second of the item tower at a batch size (offline cost)."""
    call = user_tower_call(tower, seq_len, batch)
    with threads(n_threads), exclusive():
        t = measure(call, warmup=2, min_repeats=3, min_seconds=min_seconds)
    return {"items_per_s": batch / (t.p50 / 1e3), "batch": batch, "seq_len": seq_len, **t.as_dict()}


def environment(dtype: str = "float32") -> dict:
    """What a latency number depends on: hardware, threads, dtype, package versions."""
    return {"hardware": hardware(), "threads": torch.get_num_threads(), "dtype": dtype, "versions": versions()}
