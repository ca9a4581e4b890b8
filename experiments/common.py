"""What the benchmark scripts share: train a run or reuse the finished one, time runs' online requests
interleaved in one process, and write a benchmark JSON stamped with where and when it was measured.

Scripts run as `python experiments/<name>.py`, which puts this folder on the import path (`from common import …`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from recsys.tracking.quiet import quiet_third_party

quiet_third_party()  # before torch, Lightning and transformers are imported: their import-time noise too

from recsys.config import load_config, read_yaml  # noqa: E402
from recsys.efficiency.latency import Timing, exclusive, interleaved, threads  # noqa: E402
from recsys.errors import RecsysError  # noqa: E402
from recsys.recipes.profile import online_request  # noqa: E402
from recsys.recipes.train import interrupted_checkpoint, train  # noqa: E402
from recsys.tracking.records import environment_record, hardware, write_json  # noqa: E402

__all__ = ["positive_ints", "run_matrix", "stamp", "time_requests", "train_or_reuse", "write_benchmark"]


def run_matrix(path: str | Path) -> dict[str, list[str]]:
    """A benchmark's runs from configs/experiments/<name>.yaml: `runs: {name: [dotted overrides]}`."""
    runs = read_yaml(path).get("runs")
    if not isinstance(runs, dict) or not all(isinstance(v, list) for v in runs.values()):
        raise RecsysError(f"{path}: expected 'runs:' mapping each run name to a list of overrides")
    return {str(k): [str(o) for o in v] for k, v in runs.items()}


def train_or_reuse(config: str, overrides: list[str], name: str, results_dir: str | Path = "results") -> Path:
    """results/runs/<name>: trained from `config` + `overrides` unless it already holds metrics.json; a fit that
    was stopped with a full-state checkpoint (`train.checkpoint_every_steps`) continues from it (`--resume`)."""
    run = Path(results_dir) / "runs" / name
    if not (run / "metrics.json").is_file():
        resume = interrupted_checkpoint(run).is_file()
        print(f"== {'resuming' if resume else 'training'} {name}", flush=True)
        train(load_config(config, [*overrides, f"tracking.results_dir={results_dir}", f"tracking.run_name={name}",
                                   "tracking.progress_bar=false"]), resume=resume)
    return run


def time_requests(runs: dict[str, tuple[str | Path, list[str] | None]], rounds: int = 20, per_round: int = 5,
                  seq_len: int | None = None) -> tuple[dict[str, Timing], dict[str, dict]]:
    """Each named run's online request (`recsys.recipes.profile.online_request`; overrides say how it is served,
    e.g. compress.precision=int8 or data.user_max_tokens=64), timed interleaved A, B, A, B … in one process
    under the measurement lock, so this machine's drift hits all alike. Returns (timings, counted costs)."""
    calls, costs = {}, {}
    for name, (run, overrides) in runs.items():
        calls[name], costs[name] = online_request(run, seq_len, overrides)
    print("== measuring online latency, interleaved", flush=True)
    with threads(None), exclusive():
        return interleaved(calls, rounds=rounds, per_round=per_round), costs


def stamp() -> dict:
    """Where and when: date, machine (CPU model and flags, threads), package versions, git commit."""
    return environment_record()


def write_benchmark(path: str | Path, payload: dict) -> None:
    """Write results/benchmarks/<name>.json: the payload plus its stamp."""
    write_json(Path(path), {**payload, **stamp()})


def exit_with(main) -> None:
    """A benchmark script's entry point: `main()`'s return code, or a user error as one line and exit 2."""
    try:
        sys.exit(main())
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def write_input_grid(path: Path, grid: list[dict]) -> None:
    """A reference run's validation grid over input lengths, with the machine that evaluated it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"hardware": hardware(), "grid": grid})


def read_input_grid(path: Path) -> list[dict]:
    """The grid `write_input_grid` wrote (or, from before it recorded the machine, the bare list)."""
    data = json.loads(Path(path).read_text())
    return data["grid"] if isinstance(data, dict) else data


def tuned_input(sweeps_dir: str | Path, run: str | Path) -> list[str] | None:
    """The serving overrides (token budget, history items) at which `run` scores best on validation, as
    experiments/ml100k_pareto.py chose and cached them (`<sweeps_dir>/reference-input-<run name>.json`); None
    before it has."""
    path = Path(sweeps_dir) / f"reference-input-{Path(run).name}.json"
    if not path.is_file():
        return None
    best = max(read_input_grid(path), key=lambda r: r["ndcg@10"])
    return [f"data.user_max_tokens={best['user_max_tokens']}", f"data.history_items={best['history_items']}"]


def positive_ints(text: str, what: str) -> list[int]:
    """A comma-separated list of positive integers, or one line saying what is wrong."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecsysError(f"{what}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise RecsysError(f"{what}: expected positive whole numbers, got {text!r}")
    if len(set(values)) != len(values):
        raise RecsysError(f"{what}: {text!r} names a value twice")
    return values
