"""`recsys sweep`: an Optuna study over training settings (λ values, budgets, any dotted config field) for the
accuracy–cost Pareto front.

A sweep YAML names the base training config, the search space, the objectives, the sampler and the number of
trials (see configs/sweeps/). Each trial trains a run under `results/sweeps/<study>/runs/`, is scored on
**validation** (accuracy) and by the latency harness (the materialized user tower at batch 1 plus exact
retrieval, measured under the machine-wide lock so parallel workers do not disturb each other), and never on
test: after the search, the Pareto trials alone are evaluated on test, once.

Storage: a journal file `results/sweeps/<study>/journal.log` by default (safe for local parallel workers), or any
RDB URL (PostgreSQL for workers on several machines; heartbeats plus a retry callback re-run the trial of a dead
worker). Workers join one study by running the same command; `--workers N` starts N local processes. A claim lock
(a file lock next to the journal; a PostgreSQL advisory lock for postgresql:// URLs) makes "count trials, then
start one" atomic, so the study records exactly `n_trials` completed trials. Re-running the command resumes.

A trial that raises, diverges (NaN loss) or runs out of memory is marked FAIL with its reason and the sweep goes
on. Validation NDCG@10 is reported after every validation so that single-objective studies can prune;
Optuna does not prune multi-objective studies, so multi-objective trials always run to the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl

from recsys.config import _check_choice, _check_positive, from_dict, load_config, read_yaml
from recsys.errors import RecsysError
from recsys.tracking.records import write_json

SAMPLERS = ("nsga2", "tpe", "gp", "random")
# objective name → (direction, where its value comes from)
OBJECTIVES = {"ndcg@10": "maximize", "recall@10": "maximize", "ndcg@20": "maximize", "recall@20": "maximize",
              "mrr@10": "maximize", "latency": "minimize", "params": "minimize", "flops": "minimize"}


@dataclass
class ParamSpec:
    """One search dimension over a dotted training-config path.

    float/int: `low`..`high` (`log` for a log scale). `zero: true` makes 0 reachable on a log scale: values are
    drawn from [low/10, high] and anything below `low` becomes 0 (the penalty switched off). categorical:
    `choices`."""

    type: str = "float"  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    zero: bool = False
    choices: list[Any] | None = None

    def __post_init__(self):
        _check_choice(self, "type", ("float", "int", "categorical"))
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("choices must be a non-empty list for a categorical parameter")
            return
        if self.low is None or self.high is None:
            raise ValueError(f"low and high are required for a {self.type} parameter")
        if not self.low < self.high:
            raise ValueError(f"empty range: low {self.low} must be < high {self.high}")
        if (self.log or self.zero) and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low}")

    def suggest(self, trial, name: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        if self.zero:
            return self.applied(trial.suggest_float(name, self.low / 10, self.high, log=True))
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def probe(self) -> Any:
        """One value this dimension can take (to validate its config path before any trial runs)."""
        return self.choices[0] if self.type == "categorical" else int(self.low) if self.type == "int" else self.low

    def applied(self, x: Any) -> Any:
        """The value a trial trains with, given what the sampler drew (below `low` on a zero range: 0)."""
        return 0.0 if self.zero and x < self.low else x


@dataclass
class SweepConfig:
    """An Optuna study over `recsys train` (`recsys sweep --config configs/sweeps/<name>.yaml`)."""

    study: str = "sweep"  # study name; outputs under <results_dir>/sweeps/<study>/
    base_config: str | None = None  # the training YAML every trial starts from
    overrides: list[str] = field(default_factory=list)  # fixed dotted overrides of the base config
    params: dict[str, ParamSpec] = field(default_factory=dict)  # dotted config path → search dimension
    objectives: list[str] = field(default_factory=lambda: ["ndcg@10", "latency"])  # validation metric, costs
    sampler: str = "nsga2"
    seed: int = 0
    n_trials: int = 24
    storage: str | None = None  # None: journal file; or an RDB URL (sqlite:///..., postgresql://...)
    reference_run: str | None = None  # dense run: normalises objectives for the hypervolume
    results_dir: str = "results"
    seq_len: int | None = None  # latency objective's user-text length (default: data.user_max_tokens)
    # data overrides the reference run is evaluated (validation) and measured under, e.g. its input length chosen
    # on validation: ["data.user_max_tokens=64", "data.history_items=10"]
    reference_overrides: list[str] = field(default_factory=list)
    max_failed: int | None = None  # stop after this many failed trials (default: n_trials)
    heartbeat_interval: int = 30  # RDB storage: seconds between a running trial's heartbeats
    grace_period: int = 120  # RDB storage: a trial without a heartbeat for this long is stale (retried)
    # the reference, measured interleaved with each trial, more than this factor off its cached latency means
    # something else was using the cores: the trial is measured again (3 tries), then FAIL
    max_reference_drift: float = 2.0

    def __post_init__(self):
        _check_choice(self, "sampler", SAMPLERS)
        _check_positive(self, "n_trials", "heartbeat_interval", "grace_period")
        if not self.max_reference_drift > 1:
            raise ValueError(f"max_reference_drift must be > 1, got {self.max_reference_drift}")
        if not self.objectives:
            raise ValueError("objectives must name at least one objective")
        for o in self.objectives:
            if o not in OBJECTIVES:
                raise ValueError(f"objectives: unknown objective {o!r} (known: {', '.join(OBJECTIVES)})")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives: listed twice")
        if not self.params:
            raise ValueError("params: the search space is empty")

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def folder(self) -> Path:
        return Path(self.results_dir) / "sweeps" / self.study


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides → (the sweep's own keys, training-config overrides appended to `overrides`)."""
    own_keys = {f.name for f in dataclasses.fields(SweepConfig)}
    own = [o for o in overrides if o.partition("=")[0].split(".")[0] in own_keys]
    return own, [o for o in overrides if o not in own]


def load_sweep(path: str | Path, overrides: list[str] | None = None,
               training_overrides: list[str] | None = None) -> SweepConfig:
    """Read and validate a sweep YAML (+ dotted overrides of its own keys, e.g. `n_trials=4`, and training
    overrides appended to its `overrides`); the base config and every parameter path are checked against the
    training config now, before any trial runs."""
    from recsys.config import _merge, parse_overrides

    data = _merge(read_yaml(path), parse_overrides(overrides or []))
    if training_overrides:
        data["overrides"] = [*(data.get("overrides") or []), *training_overrides]
    specs = data.get("params") or {}
    if not isinstance(specs, dict):
        raise RecsysError(f"{path}: params must map dotted config paths to ranges, got {type(specs).__name__}")
    data["params"] = {k: from_dict(ParamSpec, v, str(path), f"params.{k}.") for k, v in specs.items()}
    cfg = from_dict(SweepConfig, data, str(path))
    if cfg.base_config is None:
        raise RecsysError(f"{path}: base_config is required (the training YAML every trial starts from)")
    base = Path(cfg.base_config)
    if not base.is_file():
        raise RecsysError(f"{path}: base_config {base} not found")
    probes = {name: f"{name}={spec.probe()}" for name, spec in cfg.params.items()}
    for name, probe in probes.items():  # every path must be a valid config field with a valid value
        try:
            load_config(str(base), [*cfg.overrides, probe])
        except RecsysError as e:
            try:  # valid only beside the other dimensions (e.g. a searched budget target next to its metric)
                load_config(str(base), [*cfg.overrides, *probes.values()])
            except RecsysError:
                raise RecsysError(f"{path}: params.{name}: {e}") from None
    return cfg


# --- storage, sampler, the claim lock -------------------------------------------------------------------------

def make_storage(cfg: SweepConfig):
    import warnings

    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if cfg.storage is None:
        cfg.folder.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(cfg.folder / "journal.log")))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are marked experimental
            return RDBStorage(cfg.storage, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    except Exception as e:  # sqlalchemy / driver errors: an unreachable or malformed URL
        msg = " ".join(str(e).split())[:160]
        raise RecsysError(f"storage {_redact(cfg.storage)}: cannot connect ({type(e).__name__}: {msg})") from None


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def make_sampler(cfg: SweepConfig, offset: int = 0):
    """The study's sampler, seeded with `cfg.seed + offset`. Workers re-seed it before each trial with the number
    of trials the study holds (see run_worker): a seeded sampler made once per process would draw the same
    parameters again in every resumed run and in every parallel worker."""
    import optuna

    s, seed = cfg.sampler, cfg.seed + offset
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, cfg.n_trials // 3)))
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if s == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


@contextlib.contextmanager
def claim_lock(cfg: SweepConfig):
    """Serialises "count the trials, then start one" across this study's workers."""
    if cfg.storage and cfg.storage.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(cfg.storage)
        key = int.from_bytes(cfg.study.encode()[:7].ljust(7, b"\0"), "big")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    from filelock import FileLock

    cfg.folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cfg.folder / "claim.lock")):
        yield


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's worker: RDB heartbeats judge it, not us
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def reap_stale(study) -> int:
    """Journal storage has no heartbeats: a RUNNING trial whose worker process (on this machine) is gone is
    marked FAIL and its parameters are queued again. Returns the number reaped."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker and not _alive(worker):
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", f"worker {worker} died")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
            n += 1
    return n


# --- one trial --------------------------------------------------------------------------------------------------

def online_request(run_dir: str | Path, seq_len: int | None,
             overrides: list[str] | None = None) -> tuple[Callable[[], object], dict]:
    """One online request of a run (its materialized user tower served at `compress.precision`, batch 1, then
    exact retrieval over its catalog) and the compact shape's parameters and online FLOPs. `overrides` change
    how the run is served (e.g. its data.user_max_tokens), not its weights."""
    from recsys.efficiency.cost import online_cost
    from recsys.efficiency.latency import request_calls
    from recsys.efficiency.materialize import materialize
    from recsys.efficiency.quantize import route_for
    from recsys.train import load_run

    run_cfg, module = load_run(run_dir, overrides)
    seq = seq_len or run_cfg.data.user_max_tokens
    n_items = _catalog_size(run_dir, run_cfg)
    tower = materialize(module.user_tower)
    route = route_for(run_cfg.compress.precision, run_cfg.compress.int8_backend)
    user, search = request_calls(tower, seq, n_items, route, run_cfg.compress.quantize_layers)
    c = online_cost(tower.shape.replace(seq_len=seq, batch=1), n_items)
    return (lambda: (user(), search())), {"params": c["user_params"], "flops": c["flops"], "n_items": n_items}


def measure_online(run_dir: str | Path, seq_len: int | None = None, reference: str | Path | None = None,
                   overrides: list[str] | None = None,
                   reference_overrides: list[str] | None = None) -> dict[str, float]:
    """Cost objectives of a run: measured online latency (median and p90 ms, under the measurement lock),
    parameters and online FLOPs of its compact shape. With a `reference` run the two requests are measured
    interleaved (A, B, A, B …) and `latency_ratio` = run / reference is free of this machine's drift."""
    from recsys.efficiency.latency import exclusive, interleaved, measure, threads

    call, costs = online_request(run_dir, seq_len, overrides)
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
        from recsys.train import evaluate_run
        val = evaluate_run(cfg.reference_run, "val", progress=False, overrides=cfg.reference_overrides).metrics
    else:
        val = json.loads((Path(cfg.reference_run) / "metrics.json").read_text())["val"]
    ref = {**val, **measure_online(cfg.reference_run, cfg.seq_len, overrides=cfg.reference_overrides),
           "run": cfg.reference_run, "overrides": cfg.reference_overrides}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, ref)
    return ref


def _catalog_size(run_dir: str | Path, run_cfg) -> int:
    """Items ranked by the run: recorded in metrics.json (runs before that field: the dataset, loaded again)."""
    import json

    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    if "catalog_items" in metrics:
        return int(metrics["catalog_items"])
    from recsys.train import load_data
    return load_data(run_cfg.data)[1].n_items


class Reporter(pl.Callback):
    """Reports validation NDCG@10 to the trial after every validation; prunes single-objective studies."""

    def __init__(self, trial, single_objective: bool):
        self.trial, self.single, self.curve = trial, single_objective, []

    def on_validation_end(self, trainer, module):
        import optuna

        value = trainer.callback_metrics.get("val/ndcg@10")
        if value is None or trainer.sanity_checking:
            return
        self.curve.append((trainer.global_step, float(value)))
        if self.single:
            self.trial.report(float(value), trainer.global_step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {trainer.global_step}")


def run_trial(trial, cfg: SweepConfig) -> list[float]:
    """Train one trial's run (no test evaluation), measure its costs, return the objective values."""
    from recsys.train import train

    overrides = [f"{k}={spec.suggest(trial, k)}" for k, spec in cfg.params.items()]
    name = f"trial-{trial.number:04d}"
    run_cfg = load_config(cfg.base_config, [*cfg.overrides, *overrides, f"tracking.results_dir={cfg.folder}",
                                            f"tracking.run_name={name}", f"tracking.wandb_group={cfg.study}",
                                            "tracking.progress_bar=false"])
    t0 = time.perf_counter()
    reporter = Reporter(trial, len(cfg.objectives) == 1)
    out = train(run_cfg, callbacks=[reporter], test=False)
    t1 = time.perf_counter()
    trial.set_user_attr("run_dir", out["run_dir"])
    trial.set_user_attr("val", out["val"])
    trial.set_user_attr("val_curve", reporter.curve)
    trial.set_user_attr("overrides", overrides)
    costs = {}
    if set(cfg.objectives) & {"latency", "params", "flops"}:
        ref = reference_costs(cfg)
        for _ in range(3):
            costs = measure_online(out["run_dir"], cfg.seq_len, reference=ref["run"] if ref else None,
                                   reference_overrides=cfg.reference_overrides)
            why = disturbed(costs, ref, cfg.max_reference_drift)
            if why is None:
                break
        else:
            raise RecsysError(why)
        if ref:  # the latency at the machine speed the reference was measured at: ratio × reference ms
            costs["latency_measured"] = costs["latency"]
            costs["latency"] = costs["latency_ratio"] * ref["latency"]
    trial.set_user_attr("costs", costs)
    trial.set_user_attr("own_seconds", time.perf_counter() - t0)
    trial.set_user_attr("train_seconds", t1 - t0)
    return [out["val"][o] if o in out["val"] else costs[o] for o in cfg.objectives]


# --- the worker loop ----------------------------------------------------------------------------------------------

def open_study(cfg: SweepConfig):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by run_worker, one line each
    storage = make_storage(cfg)
    try:
        study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=make_sampler(cfg),
                                    directions=cfg.directions, load_if_exists=True)
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise RecsysError(f"storage {_redact(cfg.storage or str(cfg.folder / 'journal.log'))}: {msg}") from None
    have = [d.name.lower() for d in study.directions]
    if have != cfg.directions:
        raise RecsysError(f"study {cfg.study!r} exists with directions {have}, the sweep config asks for "
                          f"{cfg.directions} (objectives {cfg.objectives}); use another study name")
    return study


def count_claimed(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))


def run_worker(cfg: SweepConfig) -> int:
    """Run trials until the study holds `n_trials` completed (or running) trials; returns how many ran here."""
    import optuna

    study = open_study(cfg)
    ran = 0
    while True:
        lock = claim_lock(cfg)
        lock.__enter__()
        held = True

        def objective(trial, lock=lock):
            nonlocal held
            trial.set_user_attr("worker", _worker_id())
            lock.__exit__(None, None, None)  # the trial exists (RUNNING): other workers may count it now
            held = False
            try:
                return run_trial(trial, cfg)
            except optuna.TrialPruned:
                raise
            except Exception as e:
                reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                trial.set_user_attr("fail_reason", reason)
                print(f"trial {trial.number} failed: {reason}", file=sys.stderr, flush=True)
                raise

        try:
            if cfg.storage:  # RDB: heartbeats find stale trials, the retry callback queues them again
                optuna.storages.fail_stale_trials(study)
            else:
                reap_stale(study)
            if count_claimed(study) >= cfg.n_trials:
                break
            failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
            if failed >= (cfg.max_failed or cfg.n_trials):
                print(f"warning: stopping: {failed} trials failed (max_failed {cfg.max_failed or cfg.n_trials})",
                      file=sys.stderr)
                break
            # under the claim lock the trial count is this trial's number: one seed per trial, the same draws
            # whether the study ran in one go, was resumed, or is shared by several workers
            study.sampler = make_sampler(cfg, offset=len(study.get_trials(deepcopy=False)))
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            ran += 1
        finally:
            if held:
                lock.__exit__(None, None, None)
    return ran


def sweep(cfg: SweepConfig, workers: int = 1, config_path: str | None = None, overrides: list[str] | None = None,
          report: bool = True) -> dict | None:
    """Run the study with `workers` local processes (this one included), then write the report."""
    import datetime as dt

    from recsys.search.report import write_report

    t0, since = time.perf_counter(), dt.datetime.now()
    procs = []
    if workers > 1:
        if config_path is None:
            raise RecsysError("--workers needs the sweep to come from a config file")
        cmd = [sys.executable, "-m", "recsys.cli", "sweep", "--config", config_path, "--no-report",
               *(overrides or [])]
        procs = [subprocess.Popen(cmd) for _ in range(workers - 1)]
    try:
        run_worker(cfg)
    finally:
        codes = [p.wait() for p in procs]
    if any(codes):
        print(f"warning: {sum(1 for c in codes if c)} worker process(es) exited with an error", file=sys.stderr)
    if not report:
        return None
    return write_report(cfg, wall_seconds=time.perf_counter() - t0, workers=workers, since=since)

