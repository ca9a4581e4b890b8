"""Latency predictor: per-operator lookup tables measured on this device, interpolated and summed.

Tables (batch 1, the online case): attention block at h heads × sequence length L, FFN block at n neurons × L,
embeddings at L, pooling at L, projection at d_out, and exact catalog scoring at N items × d. A shape's
latency is the sum over its layers plus a constant overhead calibrated on the dense model. The soft form
(`predict_soft`) interpolates at the expected head/neuron counts and weights each block by its presence
probability, so it is differentiable in the gate probabilities (the λ-latency penalty uses it).

Tables are cached on disk under a key of hardware, threads, dtype and torch version; a different key
rebuilds them (with a progress bar). Building takes about a minute for MiniLM-sized grids.

Precision is part of the key: a tower served by another route (bf16 + compile, int8 through torchao or ONNX
Runtime; `recsys.serving.quantize.ROUTES`) gets its own three calibration constants, fitted on the
calibration shapes served by that route, over the fp32 operator tables — the operators' relative costs carry
over, their absolute speed-up and the route's fixed cost are fitted (`recsys profile --validate --precision`
measures how well).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recsys.efficiency.cost import SoftShape
from recsys.efficiency.shape import LayerShape, Shape
from recsys.tracking.records import cpu_flags, cpu_model

CACHE_DIR = Path(os.environ.get("RECSYS_CACHE", Path.home() / ".cache" / "recsys")) / "latency"
SEQ_GRID = (16, 32, 64, 128, 256)
CALIBRATION_SHAPES = 12


def _interp(grid: torch.Tensor, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of values [G] on an increasing grid [G] at x (differentiable in x)."""
    x = x.clamp(grid[0], grid[-1])
    i = torch.searchsorted(grid, x.detach().reshape(-1), right=True).clamp(1, len(grid) - 1).reshape(x.shape)
    x0, x1, y0, y1 = grid[i - 1], grid[i], values[i - 1], values[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _interp2(grid_a, grid_l, table, a, seq_len: int) -> torch.Tensor:
    """Interpolate table [A, L] at (a, seq_len): first along L (fixed), then along a (differentiable)."""
    col = torch.stack([_interp(grid_l, table[r], torch.tensor(float(seq_len), dtype=table.dtype))
                       for r in range(table.shape[0])])  # [A]
    return _interp(grid_a, col, a)


@dataclass
class LatencyTables:
    """Measured milliseconds per operator; `key` names the device and conditions they hold for."""

    key: dict
    hidden: int
    head_dim: int
    seq: list[int]
    heads: list[int]
    attn_ms: list[list[float]]  # [heads, seq]
    neurons: list[int]
    ffn_ms: list[list[float]]  # [neurons, seq]
    embed_ms: list[float]  # [seq]
    pool_ms: list[float]  # [seq]
    proj_dims: list[int]
    proj_ms: list[float]
    items: list[int]
    dims: list[int]
    retrieval_ms: list[list[float]]  # [items, dims]
    overhead_ms: float = 0.0
    # whole-model time ≈ attn_scale · Σ attention + ffn_scale · Σ FFN + embeddings + pooling + overhead,
    # the three constants fitted by least squares on calibration shapes measured in the model
    attn_scale: float = 1.0
    ffn_scale: float = 1.0

    def t(self, name) -> torch.Tensor:
        return torch.tensor(getattr(self, name), dtype=torch.float64)


TABLES_VERSION = 4  # bump when the table format or the calibration changes: cached tables are rebuilt


def device_key(dtype: str = "float32", n_threads: int | None = None) -> dict:
    """What a table's numbers depend on. The CPU's vector flags are part of it: machines that report the same
    model name ("AMD EPYC") have come with AVX2 only and with AVX-512 VNNI/BF16, at very different speeds."""
    return {"version": TABLES_VERSION, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "threads": n_threads or torch.get_num_threads(), "dtype": dtype,
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _cache_path(key: dict, base: Shape, cache_dir: Path) -> Path:
    blob = json.dumps({**key, "hidden": base.hidden, "head_dim": base.head_dim, "heads": base.n_heads_dense,
                       "ffn": base.ffn_dense}, sort_keys=True)
    return cache_dir / f"tables-{hashlib.sha1(blob.encode()).hexdigest()[:16]}.json"


def _block_sums(tab: LatencyTables, heads: torch.Tensor, neurons: torch.Tensor, attn_p: torch.Tensor,
                ffn_p: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ attention ms, Σ FFN ms, embeddings + pooling ms) from the tables, before calibration."""
    L = torch.tensor(float(seq_len), dtype=torch.float64)
    seq = tab.t("seq")
    fixed = _interp(seq, tab.t("embed_ms"), L) + _interp(seq, tab.t("pool_ms"), L)
    a_grid = torch.tensor([0.0, *tab.heads], dtype=torch.float64)
    a_tab = torch.cat([torch.zeros(1, len(tab.seq), dtype=torch.float64), tab.t("attn_ms")])
    f_grid = torch.tensor([0.0, *tab.neurons], dtype=torch.float64)
    f_tab = torch.cat([torch.zeros(1, len(tab.seq), dtype=torch.float64), tab.t("ffn_ms")])
    attn = sum(attn_p[i] * _interp2(a_grid, seq, a_tab, heads[i], seq_len) for i in range(len(heads)))
    ffn = sum(ffn_p[i] * _interp2(f_grid, seq, f_tab, neurons[i], seq_len) for i in range(len(heads)))
    return torch.as_tensor(attn, dtype=torch.float64), torch.as_tensor(ffn, dtype=torch.float64), fixed


def retrieval_ms(tab: LatencyTables, n_items: int, dim: torch.Tensor | float) -> torch.Tensor:
    """Exact scoring time: interpolated in log(items) and in dim."""
    dim = torch.as_tensor(dim, dtype=torch.float64)
    log_items = torch.tensor(np.log(tab.items), dtype=torch.float64)
    table = tab.t("retrieval_ms")  # [items, dims]
    per_items = torch.stack([_interp(tab.t("dims"), table[r], dim) for r in range(len(tab.items))])
    return _interp(log_items, per_items, torch.tensor(np.log(n_items), dtype=torch.float64))


def predict_soft(tab: LatencyTables, s: SoftShape, n_items: int | None = None) -> torch.Tensor:
    """Expected online latency (ms) of a soft shape: differentiable in every keep-probability."""
    b = s.base
    attn, ffn, fixed = _block_sums(tab, s.heads.sum(1), s.ffn.sum(1), s.attn_block, s.ffn_block, b.seq_len)
    total = tab.attn_scale * attn + tab.ffn_scale * ffn + fixed + tab.overhead_ms
    dim = s.out.sum() if s.out is not None else torch.tensor(float(b.hidden), dtype=torch.float64)
    if s.out is not None:
        total = total + _interp(tab.t("proj_dims"), tab.t("proj_ms"), dim)
    if n_items:
        total = total + retrieval_ms(tab, n_items, dim)
    return total


def predict(tab: LatencyTables, shape: Shape, n_items: int | None = None) -> float:
    """Predicted latency (ms) of a hard shape at batch 1: user tower (+ exact retrieval over n_items)."""
    return float(predict_soft(tab, SoftShape.from_shape(shape), n_items))


def calibrate(tab: LatencyTables, shapes: list[Shape], measured_ms: list[float]) -> None:
    """Fit attn_scale, ffn_scale and overhead_ms by least squares on shapes measured in the model.

    Operators timed alone run with warm caches and miss the per-module Python cost; attention and FFN differ
    in how much, and the overhead absorbs the rest. Calibration shapes are drawn apart from any shapes the
    predictor is validated on."""
    rows = []
    for shape in shapes:
        s = SoftShape.from_shape(shape)
        attn, ffn, fixed = _block_sums(tab, s.heads.sum(1), s.ffn.sum(1), s.attn_block, s.ffn_block, shape.seq_len)
        rows.append((float(attn), float(ffn), float(fixed)))
    from scipy.optimize import lsq_linear

    x, m = np.array(rows), np.asarray(measured_ms)
    a = np.stack([x[:, 0], x[:, 1], np.ones(len(x))], axis=1)
    # relative least squares (rows weighted by 1/measured: the error that matters is a percentage); the scales
    # stay within [1/4, 4] of the operators' own times (so the prediction keeps growing with structure even when
    # noise dominates a tiny model's calibration) and the overhead is non-negative
    coef = lsq_linear(a / m[:, None], (m - x[:, 2]) / m, bounds=([0.25, 0.25, 0.0], [4.0, 4.0, np.inf])).x
    tab.attn_scale, tab.ffn_scale, tab.overhead_ms = (float(c) for c in coef)


def calibration_shapes(base: Shape) -> list[Shape]:
    """The dense tower, the empty tower (embeddings + pooling only) and random sub-shapes drawn apart from the
    validation draws (seed 0)."""
    rng = np.random.default_rng(12345)
    dense = base.dense().replace(batch=1, output_dim=None)
    empty = dense.replace(layers=tuple(LayerShape((), 0) for _ in dense.layers))
    return [dense, empty] + [random_subshape(dense, rng) for _ in range(CALIBRATION_SHAPES - 2)]


def _cached(path: Path, key: dict) -> LatencyTables | None:
    try:
        data = json.loads(path.read_text())
        return LatencyTables(**data) if data.get("key") == key else None
    except (OSError, json.JSONDecodeError, TypeError, UnicodeDecodeError):
        return None  # missing, corrupt or outdated: rebuilt by the caller


def random_subshape(base: Shape, rng: np.random.Generator) -> Shape:
    """A random sub-shape of `base`: an overall keep fraction (so sizes span tiny to dense), random head
    subsets and FFN widths around it per layer, and occasionally a dropped block."""
    keep = rng.uniform(0.03, 1.0)
    layers = []
    for _ in range(base.n_layers):
        n_heads = int(rng.binomial(base.n_heads_dense, keep)) if rng.random() > 0.1 else 0
        heads = tuple(sorted(rng.choice(base.n_heads_dense, n_heads, replace=False).tolist()))
        width = keep * rng.uniform(0.5, 1.5) if rng.random() > 0.1 else 0.0
        layers.append(LayerShape(heads, int(np.clip(round(width * base.ffn_dense), 0, base.ffn_dense))))
    return base.replace(layers=tuple(layers))
