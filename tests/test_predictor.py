"""Latency predictor on a tiny architecture: interpolation, caching, the soft form's gradients."""
import numpy as np
import pytest
import torch

from recsys.efficiency.cost import SoftShape
from recsys.efficiency.predictor import _interp, predict, predict_soft, random_subshape
from recsys.efficiency.shape import LayerShape, Shape
from recsys.serving.latency_tables import load_or_build

BASE = Shape(layers=(LayerShape((0, 1, 2, 3), 128),) * 2, hidden=64, head_dim=16, n_heads_dense=4, ffn_dense=128,
             vocab_size=30522, max_positions=128, type_vocab_size=2, seq_len=32)


def test_interp_is_linear_between_grid_points_and_clamped():
    grid = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    vals = torch.tensor([0.0, 2.0, 6.0], dtype=torch.float64)
    x = torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64)
    assert _interp(grid, vals, x).tolist() == [1.0, 4.0, 6.0]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    kw = dict(items=(1000, 4000), dims=(16, 64), seq=(16, 32, 64), min_seconds=0.01, progress=False)
    tab = load_or_build(BASE, cache_dir=cache, **kw)
    return tab, cache, kw


def test_tables_are_cached_by_device_key(tables):
    tab, cache, kw = tables
    files = list(cache.glob("tables-*.json"))
    assert len(files) == 1
    again = load_or_build(BASE, cache_dir=cache, **kw)
    assert again.attn_ms == tab.attn_ms and again.overhead_ms == tab.overhead_ms


def test_anchor_refits_calibration_on_cached_tables(tables):
    tab, cache, kw = tables
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("tables-*.json")}
    anchored = load_or_build(BASE, cache_dir=cache, anchor=True, **kw)
    assert anchored.attn_ms == tab.attn_ms  # the operator tables come from the cache, unchanged
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("tables-*.json")} == before  # nothing rewritten
    # the constants are refitted on measurements taken now: they stay in their bounds and predict the dense tower
    assert 0.25 <= anchored.attn_scale <= 4 and 0.25 <= anchored.ffn_scale <= 4 and anchored.overhead_ms >= 0
    assert predict(anchored, BASE) > predict(anchored, BASE.replace(layers=(LayerShape((), 0),) * 2))


def test_prediction_is_monotone_in_structure_and_dense_is_calibrated(tables):
    tab, _, _ = tables
    dense = predict(tab, BASE)
    smaller = predict(tab, BASE.replace(layers=(LayerShape((0,), 32), LayerShape((), 32))))
    assert smaller < dense
    assert predict(tab, BASE, n_items=4000) > dense
    rng = np.random.default_rng(0)
    assert all(predict(tab, random_subshape(BASE, rng)) > 0 for _ in range(5))


def test_soft_prediction_has_gradients_and_matches_hard_at_zero_one(tables):
    tab, _, _ = tables
    shape = BASE.replace(layers=(LayerShape((0, 2), 50), LayerShape((1,), 0)), output_dim=16)
    soft = SoftShape.from_shape(shape)
    assert float(predict_soft(tab, soft)) == pytest.approx(predict(tab, shape))
    heads = soft.heads.clone().fill_(0.5).requires_grad_()
    out = predict_soft(tab, SoftShape(shape, heads, soft.ffn, soft.attn_block, soft.ffn_block, soft.out), 1000)
    out.backward()
    assert heads.grad[0].abs().sum() > 0  # layer 0 attention is present: more heads cost more
