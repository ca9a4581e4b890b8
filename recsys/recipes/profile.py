"""`recsys profile`: what a tower at a shape costs — counted, measured and predicted — and how good the
latency predictor is (`validate`); and what a trained run's online request is (`online_request`), the one call
sweeps and benchmarks time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from recsys.data.registry import load_data
from recsys.efficiency.cost import cost, online_cost
from recsys.efficiency.latency import environment, exclusive, item_throughput, measure, threads
from recsys.efficiency.predictor import calibrate, calibration_shapes, predict, random_subshape
from recsys.efficiency.shape import Shape
from recsys.errors import RecsysError
from recsys.models.encoder import BertEncoder, model_config
from recsys.models.sequence_tower import input_cost, user_input_length
from recsys.models.tower import Tower
from recsys.runs import load_run
from recsys.serving.latency_tables import load_or_build, measure_towers
from recsys.serving.materialize import materialize
from recsys.serving.quantize import BACKENDS, DTYPE_OF, ROUTE_OF, route_for
from recsys.serving.routes import request_calls, served_user_call


def _dense_shape(encoder: str, seq_len: int) -> Shape:
    return Shape.dense_from_hf_config(model_config(encoder), seq_len=seq_len)


def load_shape(path: str | Path) -> Shape:
    p = Path(path)
    if not p.is_file():
        raise RecsysError(f"shape file not found: {p}")
    try:
        return Shape.from_dict(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise RecsysError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    except ValueError as e:
        raise RecsysError(f"{p}: {e}") from None


def _tower(shape: Shape, encoder: str):
    enc = BertEncoder.from_pretrained(encoder, shape=shape.replace(output_dim=None, seq_len=128, batch=1))
    return Tower(enc, shape.hidden, shape.output_dim).eval()


def _route(precision: str, int8_backend: str) -> str:
    if precision not in ROUTE_OF:
        raise RecsysError(f"--precision: unknown precision {precision!r} (expected {', '.join(ROUTE_OF)})")
    if int8_backend not in BACKENDS:
        raise RecsysError(f"--int8-backend: unknown backend {int8_backend!r} (expected {', '.join(BACKENDS)})")
    return route_for(precision, int8_backend)


def profile(encoder: str = "minilm", shape_path: str | None = None, seq_len: int = 128, n_items: int = 10000,
            n_threads: int | None = None, progress: bool = True, precision: str = "fp32",
            int8_backend: str = "torchao") -> dict:
    """Params, FLOPs, bytes, measured and predicted online latency, item throughput of one tower, served at
    `precision` (fp32 | bf16 | int8, int8 through `int8_backend`'s kernels); the predictor uses the tables
    calibrated for that serving route."""
    route = _route(precision, int8_backend)
    dense = _dense_shape(encoder, seq_len)
    shape = load_shape(shape_path).replace(seq_len=seq_len, batch=1) if shape_path else dense.replace(batch=1)
    shape = shape.replace(dtype=DTYPE_OF[precision])
    with threads(n_threads):
        try:
            tower = _tower(shape, encoder)  # checks the shape against the checkpoint before any measuring
        except RecsysError as e:
            raise RecsysError(f"{shape_path}: {e}" if shape_path else str(e)) from None
        tab = load_or_build(dense.replace(batch=1), progress=progress, anchor=True, route=route)
        user_ms = measure(served_user_call(tower, seq_len, route), min_seconds=1.0)
        thr = item_throughput(tower, batch=64, seq_len=24) if precision == "fp32" else None
    on = online_cost(shape, n_items)
    return {"shape": shape.to_dict(), **cost(shape), "online_flops": on["flops"], "n_items": n_items,
            "measured_user_ms": user_ms.as_dict(), "precision": precision, "route": route,
            "predicted_user_ms": predict(tab, shape), "predicted_online_ms": predict(tab, shape, n_items),
            "item_throughput": thr,
            **environment(shape.dtype)}


def validate(encoder: str = "minilm", n_shapes: int = 30, seq_len: int = 128, seed: int = 0,
             n_threads: int | None = None, progress: bool = True, rounds: int = 5, precision: str = "fp32",
             int8_backend: str = "torchao") -> dict:
    """Measure (interleaved, in `rounds`) and predict `n_shapes` random sub-shapes of `encoder` (the dense
    shape first) served at `precision`, the predictor's calibration shapes measured alongside; report the
    predictor's error. Random weights: latency does not depend on their values."""
    route = _route(precision, int8_backend)
    dense = _dense_shape(encoder, seq_len).replace(batch=1)
    rng = np.random.default_rng(seed)
    shapes = [dense] + [random_subshape(dense, rng) for _ in range(n_shapes - 1)]
    cal = calibration_shapes(dense)
    with threads(n_threads):
        tab = load_or_build(dense, progress=progress)
        with exclusive():
            measured = measure_towers(shapes + cal, rounds=rounds, route=route)
    # The calibration shapes are measured in the same rounds (this machine's speed drifts 10-30% within
    # minutes) and the three constants refitted on them alone: the validation shapes are never fitted.
    measured, cal_measured = measured[:len(shapes)], measured[len(shapes):]
    calibrate(tab, cal, cal_measured)
    rows = [{"shape": s.to_dict(), "measured_ms": ms, "predicted_ms": predict(tab, s)}
            for s, ms in zip(shapes, measured, strict=True)]
    m = np.array([r["measured_ms"] for r in rows])
    p = np.array([r["predicted_ms"] for r in rows])
    err = np.abs(p - m) / m * 100
    # Relative to dense (what the λ-latency penalty uses, T/T_dense): predicted ratio × dense measured now.
    # This machine drifts 10-20% between the table build and a later measurement; the ratio does not.
    anchored = p / p[0] * m[0]
    rel = np.abs(anchored - m) / m * 100
    for r, a in zip(rows, anchored, strict=True):
        r["predicted_ms_anchored"] = float(a)
    env = environment()
    return {"mape": float(err.mean()), "p90_abs_pct_err": float(np.percentile(err, 90)),
            "mape_relative_to_dense": float(rel[1:].mean()), "p90_relative_to_dense": float(np.percentile(rel[1:], 90)),
            "within_10pct_relative_to_dense": float((rel[1:] <= 10).mean()),
            "within_10pct": float((err <= 10).mean()), "n_shapes": len(rows),
            "measured_ms_min": float(m.min()), "measured_ms_max": float(m.max()), "device": env["hardware"]["cpu"],
            "threads": env["threads"], "precision": precision, "route": route, "batch": 1, "seq_len": seq_len,
            "calibration": {"attn_scale": tab.attn_scale, "ffn_scale": tab.ffn_scale, "overhead_ms": tab.overhead_ms},
            "versions": env["versions"], "shapes": rows}


def online_request(run_dir: str | Path, seq_len: int | None = None,
                   overrides: list[str] | None = None) -> tuple[Callable[[], object], dict]:
    """One online request of a run (its materialized user tower served at `compress.precision`, batch 1, then
    exact retrieval over its catalog) and the compact shape (`shape`), its parameters and online FLOPs.
    `overrides` change how the run is served (e.g. its data.user_max_tokens), not its weights. The one way
    every sweep and benchmark measures a run's request. A run whose `retrieval.index` is not exact is served
    through that index (`recsys.recipes.retrieval_index.online_request_index`: built over its real catalog and
    cached), so sweeps and benchmarks see the index in the latency."""
    run_cfg, module = load_run(run_dir, overrides)
    if run_cfg.retrieval.index != "exact":
        from recsys.recipes.retrieval_index import online_request_index  # faiss: imported only when used
        call, costs = online_request_index(run_dir, None, seq_len, overrides, loaded=(run_cfg, module))
        return call, {k: costs[k] for k in ("params", "flops", "n_items", "shape", "spec")}
    seq = seq_len or user_input_length(run_cfg.model, run_cfg.data)  # tokens, or a sequence tower's N items
    n_items = _catalog_size(run_dir, run_cfg)
    tower = materialize(module.user_tower)
    route = route_for(run_cfg.compress.precision, run_cfg.compress.int8_backend)
    user, search = request_calls(tower, seq, n_items, route, run_cfg.compress.quantize_layers)
    shape = tower.shape.replace(seq_len=seq, batch=1)
    c = online_cost(shape, n_items)
    extra = input_cost(tower, seq) if module.sequence else {"params": 0, "flops": 0}  # its input layers
    return (lambda: (user(), search())), {"params": c["user_params"] + extra["params"],
                                          "flops": c["flops"] + extra["flops"], "n_items": n_items, "shape": shape}


def _catalog_size(run_dir: str | Path, run_cfg) -> int:
    """Items ranked by the run: recorded in metrics.json (runs before that field: the dataset, loaded again)."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    if "catalog_items" in metrics:
        return int(metrics["catalog_items"])
    return load_data(run_cfg.data)[1].n_items
