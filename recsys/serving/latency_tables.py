"""Latency tables measured on this device: the predictor's operator tables (`recsys.efficiency.predictor`) built
by timing our encoder's own blocks, and calibrated on whole towers served by a route (`recsys.serving.routes`).

Building takes about a minute for MiniLM-sized grids; tables are cached on disk under a key of hardware,
threads, dtype and torch version (`recsys.efficiency.predictor.CACHE_DIR`). The train recipe builds them before
a latency-penalised fit and hands them to the module; `recsys profile` and the sweep's objectives read them too.

A sequence user tower (`recsys/models/sequence_tower.py`, `sequence=SequenceInput(...)`) runs the same encoder
blocks over N item vectors: its attention and FFN tables are measured alike (at its width, on a grid that holds N),
its input stage (adaptor, input projection, positions) takes the place of the token embeddings, there is no pooling
(the newest position is read), and its calibration shapes are measured as sequence towers.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recsys.efficiency import predictor
from recsys.efficiency.latency import exclusive, interleaved, measure, retrieval_call, threads
from recsys.efficiency.predictor import (
    SEQ_GRID,
    LatencyTables,
    _cache_path,
    _cached,
    calibrate,
    calibration_shapes,
    device_key,
)
from recsys.efficiency.shape import LayerShape, Shape
from recsys.errors import RecsysError
from recsys.models.encoder import FFN, Attention, BertEncoder, Embeddings
from recsys.models.sequence_tower import SequenceTower
from recsys.models.tower import Tower
from recsys.serving.routes import user_call
from recsys.tracking.records import write_json


@dataclasses.dataclass(frozen=True)
class SequenceInput:
    """What a sequence user tower reads besides its encoder: item vectors of `item_dim`, through an adaptor or not."""

    item_dim: int
    adaptor: bool = False

    @classmethod
    def of(cls, tower) -> SequenceInput | None:
        """The input of `tower` when it is a sequence tower, else None (a text tower)."""
        return cls(tower.item_dim, tower.adaptor is not None) if isinstance(tower, SequenceTower) else None


def _sequence_tower(shape: Shape, sequence: SequenceInput) -> SequenceTower:
    """A fresh sequence tower at `shape` (its output_dim: the projection back to the item dim, if any)."""
    return SequenceTower(BertEncoder(shape.replace(output_dim=None)), sequence.item_dim, shape.output_dim,
                         sequence.adaptor).eval()


def build_tables(base: Shape, items=(1000, 10000, 100000), dims=(64, 128, 256, 384),
                 heads=None, neurons=None, seq=SEQ_GRID, min_seconds: float = 0.15,
                 progress: bool = True, sequence: SequenceInput | None = None) -> LatencyTables:
    """Measure every operator of `base`'s architecture on this device (batch 1, fp32); with `sequence`, of a
    sequence tower over `base.max_positions` (N) items."""
    H, d = base.hidden, base.head_dim
    heads = list(heads or sorted({1, 2, 3, 4, 6, 8, base.n_heads_dense} & set(range(1, base.n_heads_dense + 1))))
    neurons = list(neurons or sorted({n for n in (32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072)
                                      if n < base.ffn_dense} | {base.ffn_dense}))
    seq = [s for s in seq if s <= base.max_positions]
    if sequence is not None:  # it always reads N positions (a shorter history is padded): N is on the grid, and
        N = base.max_positions  # N/2, so that there are two points to interpolate between
        seq = sorted({s for s in seq if s < N} | {N, max(1, N // 2)})
    jobs = len(heads) * len(seq) + len(neurons) * len(seq) + 2 * len(seq) + len(dims) + len(items) * len(dims)
    bar = tqdm(total=jobs, desc="latency tables", disable=not progress)

    def ms(fn) -> float:
        bar.update()
        return measure(fn, warmup=2, min_repeats=5, min_seconds=min_seconds).p50

    def attn_call(h: int, L: int):
        m, x, mask = Attention(H, h, d, 1e-12, 0.0, 0.0).eval(), torch.randn(1, L, H), torch.zeros(1, 1, 1, L)
        return lambda: m(x, mask, "sdpa")

    def ffn_call(n: int, L: int):
        m, x = FFN(H, n, "gelu", 1e-12, 0.0).eval(), torch.randn(1, L, H)
        return lambda: m(x)

    def embed_call(L: int):
        if sequence is not None:  # its input stage: the tower without blocks and without its projection
            empty = base.replace(layers=tuple(LayerShape((), 0) for _ in base.layers), output_dim=None)
            m = _sequence_tower(empty, sequence)
            x, mask = torch.randn(1, L, sequence.item_dim), torch.ones(1, L, dtype=torch.bool)
            return lambda: m(x, mask)
        m, ids = Embeddings(base, 1e-12, 0.0).eval(), torch.randint(0, 1000, (1, L))
        return lambda: m(ids, torch.zeros_like(ids))

    def pool_call(L: int):
        x, mask = torch.randn(1, L, H), torch.ones(1, L, 1)
        return lambda: torch.nn.functional.normalize((x * mask).sum(1) / mask.sum(1), dim=-1)

    def proj_call(k: int):
        lin, x = torch.nn.Linear(H, k), torch.randn(1, H)
        return lambda: lin(x)

    torch.manual_seed(0)
    with exclusive():
        attn = [[ms(attn_call(h, L)) for L in seq] for h in heads]
        ffn = [[ms(ffn_call(n, L)) for L in seq] for n in neurons]
        embed = [ms(embed_call(L)) for L in seq]
        pooled = [ms(pool_call(L)) if sequence is None else 0.0 for L in seq]  # a sequence tower reads one position
        proj = [ms(proj_call(k)) for k in dims]
        retrieval = [[ms(retrieval_call(n, k)) for k in dims] for n in items]
    bar.close()
    return LatencyTables(device_key("float32"), H, d, list(seq), heads, attn, neurons, ffn, embed, pooled,
                         list(dims), proj, list(items), list(dims), retrieval)


def measure_towers(shapes: list[Shape], rounds: int = 5, per_round: int = 3, route: str = "fp32",
                   sequence: SequenceInput | None = None) -> list[float]:
    """Median ms of a fresh tower at each shape (batch 1, its seq_len) served by `route` (a sequence tower with
    `sequence`: over seq_len cached item vectors), measured interleaved in rounds so that this machine's drift
    spreads over all shapes alike."""
    towers = [_sequence_tower(s, sequence) if sequence is not None
              else Tower(BertEncoder(s.replace(output_dim=None)), s.hidden, s.output_dim) for s in shapes]
    calls = {i: user_call(t, s.seq_len, 1000, route) for i, (t, s) in enumerate(zip(towers, shapes, strict=True))}
    timings = interleaved(calls, rounds=rounds, per_round=per_round)
    return [timings[i].p50 for i in range(len(shapes))]


def recalibrate(tab: LatencyTables, base: Shape, route: str = "fp32",
                sequence: SequenceInput | None = None) -> LatencyTables:
    """Measure the calibration shapes now, served by `route` (interleaved, under the measurement lock), and
    refit the three calibration constants: the operator tables keep their shape, the constants follow the route
    and this machine's current speed, which drifts 10-30% over minutes on a shared VM."""
    shapes = calibration_shapes(base)
    with threads(None), exclusive():
        measured = measure_towers(shapes, route=route, sequence=sequence)
    calibrate(tab, shapes, measured)
    return tab


def load_or_build(base: Shape, cache_dir: Path | None = None, progress: bool = True, anchor: bool = False,
                  route: str = "fp32", sequence: SequenceInput | None = None, **build_kw) -> LatencyTables:
    """Tables for this device, `base`'s architecture and the serving `route` (fp32 eager by default), from the
    cache (default `CACHE_DIR`, i.e. $RECSYS_CACHE/latency) or measured now (and cached).

    `anchor=True` refits the calibration constants on shapes measured now (about 10 s for MiniLM) — for
    absolute milliseconds; ratios to the dense model (what the λ-latency penalty uses) do not need it. With
    `sequence`: the tables of a sequence user tower (fp32 only), cached under their own key."""
    cache_dir = Path(cache_dir) if cache_dir is not None else predictor.CACHE_DIR
    key = device_key("float32")
    if sequence is not None:  # (served in fp32 only: another route is refused when it is measured, by user_call)
        key = {**key, "sequence": dataclasses.asdict(sequence), "positions": base.max_positions}
    path = _cache_path(key, base, cache_dir)
    tab = _cached(path, key)
    fresh = tab is None
    if fresh:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecsysError(f"latency cache folder {path.parent}: cannot create it ({e.strerror}); "
                              "set $RECSYS_CACHE to a writable folder") from None
        tab = recalibrate(dataclasses.replace(build_tables(base, progress=progress, sequence=sequence, **build_kw),
                                              key=key), base, sequence=sequence)
        write_json(path, vars(tab))
    if route == "fp32":
        return recalibrate(tab, base, sequence=sequence) if anchor and not fresh else tab
    rkey = {**key, "route": route}  # the fp32 operator tables with constants fitted on this route
    rpath = _cache_path(rkey, base, cache_dir)
    routed = None if anchor else _cached(rpath, rkey)
    if routed is None:
        routed = recalibrate(dataclasses.replace(tab, key=rkey), base, route)
        write_json(rpath, vars(routed))
    return routed
