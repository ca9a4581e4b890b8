"""The run folder: where a run lives, and reading it back.

A run folder (`results/runs/<name>/`, written by `recsys.recipes.train`) holds the resolved `config.yaml`,
`checkpoints/best.ckpt`, `metrics.json`, per-user metrics (`per_user_val.csv`, `per_user_test.csv`), the CSV log
and `record.json` (hardware, versions, git commit). This module finds and loads them: a run's config and
module, its checkpoint's state, its per-user metrics. Only recipes create run folders.
"""
from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

import torch

from recsys.config import RunConfig, from_dict, load_config, read_yaml
from recsys.errors import RecsysError
from recsys.models.teacher import Distiller
from recsys.models.two_tower import TwoTowerModule
from recsys.serving.quantize import prepare_qat


def run_paths(target: str | Path) -> tuple[Path, Path]:
    """(run folder, its checkpoint) of a run folder or a checkpoint file inside one."""
    p = Path(target)
    if p.is_file():
        if p.suffix == ".ckpt" and (p.parent.parent / "config.yaml").is_file():
            return p.parent.parent, p
        raise RecsysError(f"{p}: is a file; give the run folder (results/runs/<name>/, which holds config.yaml and "
                          "checkpoints/best.ckpt)")
    if p.is_dir():
        ckpt = p / "checkpoints" / "best.ckpt"
        if not (p / "config.yaml").is_file():
            raise RecsysError(f"{p}: not a run folder (no config.yaml)")
        if not ckpt.is_file():
            raise RecsysError(f"{p}: run has no checkpoint ({ckpt} missing)")
        return p, ckpt
    raise RecsysError(f"run not found: {p} (expected a run folder under results/runs/ or a .ckpt file)")


def load_checkpoint_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["state_dict"]
    except Exception as e:  # any unpickling/zip error: the file is not a checkpoint we wrote
        raise RecsysError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__})") from None


def build_module(cfg: RunConfig, distill: bool = True, n_catalog: int = 0) -> TwoTowerModule:
    """The two-tower module a run config describes: int8 fake-quantisation inserted for a QAT run (before a
    checkpoint is loaded into it: QAT keeps the parameters), and with `distill` the distiller, whose frozen
    teacher is the finished run `distill.teacher` names (loaded in this order, so seeded runs draw the same
    initial weights as ever)."""
    module = TwoTowerModule(model=asdict(cfg.model), train=asdict(cfg.train), compress=asdict(cfg.compress),
                            distill=asdict(cfg.distill) if distill else None, n_catalog=n_catalog)
    c = cfg.compress
    if c.qat:
        for tower in module.towers:
            prepare_qat(tower, c.quantize_layers, c.int8_backend)
    if distill and cfg.distill.teacher:
        teacher_cfg, teacher = load_teacher(cfg.distill.teacher)
        if teacher_cfg.model.user_tower != "text":
            raise RecsysError(f"distill.teacher: {cfg.distill.teacher} has a {teacher_cfg.model.user_tower} user "
                              "tower; a teacher reads user texts (the text two-tower)")
        module.attach_distiller(Distiller(cfg.distill, teacher, teacher_cfg.model.encoder, cfg.model.encoder,
                                          module.user_tower.dim, module.user_tower.encoder.shape, cfg.model.layers))
    return module


def load_teacher(target: str | Path) -> tuple[RunConfig, TwoTowerModule]:
    """A finished run as a frozen distillation teacher."""
    if not (Path(target) / "config.yaml").is_file():
        raise RecsysError(f"distill.teacher: {target} is not a finished run (no config.yaml)")
    return load_run(target)


def run_config(run_dir: Path) -> RunConfig:
    """A run folder's resolved config (`config.yaml`), validated, without loading its weights."""
    return from_dict(RunConfig, read_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml"))


def load_run(target: str | Path, overrides: list[str] | None = None,
             device: str | torch.device = "cpu") -> tuple[RunConfig, TwoTowerModule]:
    """A trained run's resolved config (with dotted `overrides`, e.g. another data.user_max_tokens to serve
    it at) and its module with the checkpoint's weights (eval mode, on `device`: the CPU unless asked). A distilled
    run loads without its teacher (the distillation projections are training-only)."""
    run_dir, ckpt = run_paths(target)
    cfg = load_config(run_dir / "config.yaml", overrides) if overrides else run_config(run_dir)
    state = load_checkpoint_state(ckpt)
    ids = state.get("user_tower.item_ids.weight")  # a text+id sequence tower: one ID embedding per catalog item
    module = build_module(cfg, distill=False, n_catalog=0 if ids is None else int(ids.shape[0]))
    state = {k: v for k, v in state.items() if not k.startswith("distiller.")}
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise RecsysError(f"{ckpt}: weights do not match the run's model ({str(e).splitlines()[0]})") from None
    return cfg, module.eval().to(device)


def init_weights(module, source: str | Path) -> None:
    """Copy a finished run's tower weights into `module` (whose gates, budget multipliers and an identity-
    initialised projection may be new), e.g. to prune a fine-tuned dense model. Anything else missing or of
    another size is an error."""
    run_dir, ckpt = run_paths(source)
    family = read_yaml(run_dir / "config.yaml").get("model", {}).get("user_tower", "text")
    if family != module.model_cfg.user_tower:
        raise RecsysError(f"model.init_from: {run_dir} has a {family} user tower; this model's is "
                          f"{module.model_cfg.user_tower} (model.user_tower): its weights cannot start from it")
    state, own = load_checkpoint_state(ckpt), module.state_dict()
    fresh_projection = module.model_cfg.projection_dim is None  # added by output gates: identity
    for k, v in own.items():
        if k in state:
            if state[k].shape != v.shape:
                raise RecsysError(f"model.init_from: {ckpt}: {k} has shape {tuple(state[k].shape)}, "
                                  f"this model {tuple(v.shape)}")
        elif not (".gates." in k or k.startswith(("budget.", "distiller."))
                  or (fresh_projection and ".projection." in k)):
            raise RecsysError(f"model.init_from: {ckpt} has no weight {k} (a different architecture?)")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def init_item_tower(module, source: str | Path, cfg: RunConfig) -> None:
    """Copy a finished run's item tower into `module`'s (`model.item_tower_from`), e.g. the text two-tower's
    fine-tuned item tower under a sequence user tower. The run must encode items as this config does (same item
    encoder and data.item_max_tokens: its item vectors are what is reused) and its item tower must be dense."""
    run_dir, ckpt = run_paths(source)
    src = run_config(run_dir)
    theirs = src.model.item_encoder or src.model.encoder
    ours = cfg.model.item_encoder or cfg.model.encoder
    if theirs != ours or src.data.item_max_tokens != cfg.data.item_max_tokens:
        raise RecsysError(f"model.item_tower_from: {run_dir} encodes items with {theirs} at "
                          f"data.item_max_tokens={src.data.item_max_tokens}; this config with {ours} at "
                          f"{cfg.data.item_max_tokens} (set model.encoder={theirs} "
                          f"data.item_max_tokens={src.data.item_max_tokens})")
    state = {k[len("item_tower."):]: v for k, v in load_checkpoint_state(ckpt).items() if k.startswith("item_tower.")}
    if any(".gates." in f".{k}" for k in state):
        raise RecsysError(f"model.item_tower_from: {run_dir} has a gated item tower; take the item tower of a dense "
                          "run (or of a structure-only run's dense teacher)")
    own = module.item_tower.state_dict()
    for k, v in own.items():
        if k not in state:
            raise RecsysError(f"model.item_tower_from: {ckpt} has no item-tower weight {k} (a different "
                              "architecture, e.g. model.projection_dim?)")
        if state[k].shape != v.shape:
            raise RecsysError(f"model.item_tower_from: {ckpt}: item_tower.{k} has shape {tuple(state[k].shape)}, "
                              f"this model {tuple(v.shape)} (model.projection_dim?)")
    extra = sorted(set(state) - set(own))
    if extra:
        raise RecsysError(f"model.item_tower_from: {ckpt} has item-tower weights this model lacks ({extra[0]}, …)")
    module.item_tower.load_state_dict(state)


def read_per_user(path: str | Path, metric: str) -> dict[str, float]:
    """{user id: value} of one metric from a per-user CSV written by a run or a baseline."""
    p = Path(path)
    if p.is_dir():
        p = p / "per_user_test.csv"
    if not p.is_file():
        raise RecsysError(f"per-user metrics not found: {p}")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and metric not in rows[0]:
        raise RecsysError(f"{p}: no column '{metric}'")
    return {r["user"]: float(r[metric]) for r in rows}


def training_log(run: str | Path, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """The rows of a run's CSV training log (`log/metrics.csv`, one every `tracking.log_every_steps` steps) that
    carry every one of `keys`, as {"step", *keys} floats in step order; e.g. a budget run's expected cost ratio
    ("cost/user_latency") and ramped target ("budget/target") per step, up to where its structure was fixed."""
    path = Path(run) / "log" / "metrics.csv"
    if not path.is_file():
        raise RecsysError(f"training log not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not set(keys) <= set(rows[0]):
        raise RecsysError(f"{path}: no column {', '.join(sorted(set(keys) - set(rows[0])))}")
    out = [{"step": float(r["step"]), **{k: float(r[k]) for k in keys}} for r in rows if all(r[k] for k in keys)]
    return sorted(out, key=lambda r: r["step"])


def check_lengths(cfg: RunConfig, module) -> None:
    """Token budgets within what the encoders can read (their position embeddings)."""
    users = () if module.sequence else (("user_max_tokens", module.user_tower),
                                        ("train_user_max_tokens", module.user_tower))  # a sequence tower reads items
    items = () if module.item_tower is None else (("item_max_tokens", module.item_tower),)  # an HF item encoder
    for key, tower in (*users, *items):
        n, most = getattr(cfg.data, key), tower.encoder.shape.max_positions
        if n is not None and n > most:
            raise RecsysError(f"data.{key}: {n} tokens, but the encoder reads at most {most}")
