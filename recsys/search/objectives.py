"""What a trial costs: its online request (the materialized user tower served at its precision, batch 1, then
exact retrieval over the catalog) measured interleaved with the dense reference's, and the reference's own
validation metrics and costs, cached beside the studies. A measurement disturbed by another process on the cores
(the reference far off its cached speed) is recognised and not trusted.
"""
from __future__ import annotations

import json
from pathlib import Path

from recsys.efficiency.latency import exclusive, interleaved, measure, threads
from recsys.recipes.evaluate import evaluate_run
from recsys.recipes.profile import online_request
from recsys.search.study import SweepConfig
from recsys.tracking.records import hardware, write_json


def measure_online(run_dir: str | Path, seq_len: int | None = None, reference: str | Path | None = None,
                   overrides: list[str] | None = None,
                   reference_overrides: list[str] | None = None) -> dict[str, float]:
    """Cost objectives of a run: measured online latency (median and p90 ms, under the measurement lock),
    parameters and online FLOPs of its compact shape. With a `reference` run the two requests are measured
    interleaved (A, B, A, B …) and `latency_ratio` = run / reference is free of this machine's drift."""
    call, costs = online_request(run_dir, seq_len, overrides)
    costs = {**costs, "shape": costs["shape"].to_dict()}  # stored with the trial (JSON)
    calls = {"run": call}
    if reference is not None:
        calls["reference"] = online_request(reference, seq_len, reference_overrides)[0]
    with threads(None), exclusive():
        timing = interleaved(calls, rounds=10, per_round=3) if reference else {"run": measure(call, min_seconds=1.0)}
    out = {"latency": timing["run"].p50, "latency_p90": timing["run"].p90, **costs}
    if reference is not None:
        out.update({"reference_latency_now": timing["reference"].p50,
                    "latency_ratio": timing["run"].p50 / timing["reference"].p50})
    return out


def disturbed(costs: dict, ref: dict | None, max_drift: float) -> str | None:
    """Why a trial's latency cannot be trusted, or None: the reference measured beside it ran more than
    `max_drift` times slower or faster than when it was cached. The ratio to the reference absorbs a machine
    that is uniformly slower; it does not absorb another process taking the cores for part of the rounds."""
    now = costs.get("reference_latency_now")
    if ref is None or now is None or 1 / max_drift <= now / ref["latency"] <= max_drift:
        return None
    return (f"latency measurement disturbed: the reference ran at {now:.2f} ms beside the trial, "
            f"{ref['latency']:.2f} ms when cached (another process on the cores?)")


def reference_costs(cfg: SweepConfig) -> dict | None:
    """The reference (dense) run's validation metrics and costs, measured once and cached beside the studies
    (`reference-<run>.json`, shared by a λ study and its post-hoc twin); None without a reference run."""
    if not cfg.reference_run:
        return None
    tag = ""
    if cfg.reference_overrides:  # served differently from its config: its own cache, validation evaluated again
        import hashlib
        tag = "-" + hashlib.sha1("\n".join(cfg.reference_overrides).encode()).hexdigest()[:8]
    cache = cfg.folder.parent / f"reference-{Path(cfg.reference_run).name}{tag}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if cfg.reference_overrides:
        val = evaluate_run(cfg.reference_run, "val", progress=False, overrides=cfg.reference_overrides).metrics
    else:
        val = json.loads((Path(cfg.reference_run) / "metrics.json").read_text())["val"]
    ref = {**val, **measure_online(cfg.reference_run, cfg.seq_len, overrides=cfg.reference_overrides),
           "run": cfg.reference_run, "overrides": cfg.reference_overrides, "machine": hardware()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, ref)
    return ref


