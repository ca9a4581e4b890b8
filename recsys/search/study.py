"""A sweep's study: its config (search space, objectives, sampler, storage), the Optuna storage and sampler, the
claim lock that makes "count the trials, then start one" atomic across workers, and the reaping of trials whose
worker died. See `recsys.search.sweep` for the loop that runs trials.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.config import (
    _check_choice,
    _check_positive,
    _merge,
    check_folder_name,
    from_dict,
    load_config,
    parse_overrides,
    read_yaml,
)
from recsys.errors import RecsysError

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
    # experiments/ml100k_pareto.py: choose the reference's input length on validation (sets reference_overrides)
    tune_reference_input: bool = False
    max_failed: int | None = None  # stop after this many failed trials (default: n_trials)
    heartbeat_interval: int = 30  # RDB storage: seconds between a running trial's heartbeats
    grace_period: int = 120  # RDB storage: a trial without a heartbeat for this long is stale (retried)
    # the reference, measured interleaved with each trial, more than this factor off its cached latency means
    # something else was using the cores: the trial is measured again (3 tries), then FAIL
    max_reference_drift: float = 2.0

    def __post_init__(self):
        check_folder_name(self.study, "study")
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


def make_storage(cfg: SweepConfig):
    import warnings

    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback

    if cfg.storage is None:
        cfg.folder.mkdir(parents=True, exist_ok=True)
        return JournalStorage(journal_backend(cfg.folder / "journal.log"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are marked experimental
            return RDBStorage(cfg.storage, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    except Exception as e:  # sqlalchemy / driver errors: an unreachable or malformed URL
        msg = " ".join(str(e).split())[:160]
        raise RecsysError(f"storage {_redact(cfg.storage)}: cannot connect ({type(e).__name__}: {msg})") from None


def journal_backend(path: Path):
    """Optuna's journal file, read and appended as a write-ahead log: a torn last record (a worker killed mid-write,
    a full disk: bytes after the last newline) is cut off before anything is appended, so a new record never
    lands on the torn line. The torn bytes are kept in `<journal>.torn` and reported in one line; the study
    resumes from its last complete record. Optuna appends under the journal's lock, and so does the cut."""
    import json

    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    class _Journal(JournalFileBackend):
        def __init__(self, file_path: str):
            self._own_lock = JournalFileSymlinkLock(file_path)
            super().__init__(file_path, lock_obj=self._own_lock)

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
            self._own_lock.acquire()
            try:
                _cut_torn_tail(Path(self._file_path))
                with open(self._file_path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                self._own_lock.release()

    backend = _Journal(str(path))
    if _torn_tail(path):
        backend._own_lock.acquire()
        try:
            _cut_torn_tail(path)
        finally:
            backend._own_lock.release()
    return backend


def _torn_tail(path: Path) -> bool:
    """Whether the journal's last record is incomplete (the file does not end with a newline)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _cut_torn_tail(path: Path) -> None:
    """Cut the journal back to its last newline (call with the journal's lock held); the torn bytes go to
    `<journal>.torn` first (fsynced), so nothing is lost if this process dies between the two steps."""
    if not _torn_tail(path):
        return
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        keep, step = end, 1 << 16
        while keep > 0:  # the last newline, read backwards in blocks
            start = max(0, keep - step)
            f.seek(start)
            i = f.read(keep - start).rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            keep = start
        f.seek(keep)
        torn = f.read()
        aside = path.with_name(path.name + ".torn")
        with open(aside, "ab") as t:
            t.write(torn + b"\n")
            t.flush()
            os.fsync(t.fileno())
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    print(f"warning: {path}: its last record is incomplete ({len(torn)} bytes after the last newline: a worker "
          f"killed mid-write or a full disk); ignored and moved to {aside}, the study resumes from the last complete "
          f"record", file=sys.stderr, flush=True)


def _corrupt_line(path: Path) -> int | None:
    """The number (1-based) of the journal's first line that is not a JSON record, if any."""
    import json

    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                json.loads(line)
            except ValueError:
                return n
    return None


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


def _not_a_trial_failure(record) -> bool:
    return "failed with parameters" not in record.getMessage()


def open_study(cfg: SweepConfig):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Optuna's warnings show; its per-trial INFO lines do not
    # a failed trial is reported by run_worker in one line; Optuna's own report of it carries a traceback
    logging.getLogger("optuna.study._optimize").addFilter(_not_a_trial_failure)
    storage = make_storage(cfg)
    try:
        study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=make_sampler(cfg),
                                    directions=cfg.directions, load_if_exists=True)
    except Exception as e:
        journal = cfg.folder / "journal.log"
        bad = _corrupt_line(journal) if cfg.storage is None and isinstance(e, ValueError) else None
        if bad is not None:
            raise RecsysError(f"storage {journal}: line {bad} is not a complete record (the journal is corrupt "
                              f"there, not only at its end); the study cannot be read past it") from None
        msg = " ".join(str(e).split())[:160]
        raise RecsysError(f"storage {_redact(cfg.storage or str(journal))}: {msg}") from None
    have = [d.name.lower() for d in study.directions]
    if have != cfg.directions:
        raise RecsysError(f"study {cfg.study!r} exists with directions {have}, the sweep config asks for "
                          f"{cfg.directions} (objectives {cfg.objectives}); use another study name")
    # the search space is stored with the study: trials of two spaces never mix in one front
    space = search_space(cfg)
    stored = study.user_attrs.get("search_space")
    if stored is None:
        study.set_user_attr("search_space", space)
    elif stored != space:
        changed = sorted(set(stored) ^ set(space) | {k for k in set(stored) & set(space) if stored[k] != space[k]})
        raise RecsysError(f"study {cfg.study!r} exists with another search space (differs in {', '.join(changed)}); "
                          f"start a new study: study=<new name> (or remove {cfg.folder})")
    return study


def search_space(cfg: SweepConfig) -> dict:
    """The study's search space as stored with it (JSON): each dimension's spec."""
    return {k: dataclasses.asdict(v) for k, v in sorted(cfg.params.items())}


def count_claimed(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))
