"""Configs: every shipped YAML loads; overrides, unknown keys, types and ranges are checked."""
from pathlib import Path

import pytest
import yaml

from recsys.config import RunConfig, load_config, parse_overrides
from recsys.errors import RecsysError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))  # training configs; sweeps under configs/sweeps/
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#") and "recsys" in path.read_text().split("\n\n")[0]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_shipped_sweep_config_loads(path, monkeypatch):
    from recsys.search.study import load_sweep

    monkeypatch.chdir(REPO)  # base_config paths are relative to the repository root
    cfg = load_sweep(path)
    assert cfg.params and cfg.objectives and Path(cfg.base_config).is_file()
    assert "recsys sweep" in path.read_text().split("\n\n")[0]


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.lr=3e-5", "data.name=ml-100k", "model.projection_dim=128",
                             "train.examples_per_user=null", "train.devices=2"])
    assert cfg.train.lr == 3e-5 and cfg.data.name == "ml-100k" and cfg.model.projection_dim == 128
    assert cfg.train.examples_per_user is None and cfg.train.devices == 2
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("override,needle", [
    (["train.lrr=1"], "did you mean 'train.lr'"),
    (["trian.lr=1"], "did you mean 'train'"),
    (["train.batch_size=abc"], "train.batch_size: expected int"),
    (["train.lr=-1"], "lr must be > 0"),
    (["train.precision=fp8"], "precision must be one of"),
    (["model.dropout=1.5"], "dropout must be in"),
    (["train"], "expected section.key=value"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(RecsysError, match=needle.replace("(", r"\(").replace("'", "'")):
        load_config(None, override)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-4\n  batch_size: [\n")
    with pytest.raises(RecsysError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_precision_and_distillation_weight_are_sweep_dimensions(tmp_path, monkeypatch):
    from recsys.errors import RecsysError
    from recsys.search.study import load_sweep

    monkeypatch.chdir(REPO)
    body = ("study: x\nbase_config: configs/ml100k_lambda.yaml\nn_trials: 2\nparams:\n"
            "  distill.alpha: {low: 0.1, high: 2.0, log: true}\n"
            "  compress.precision: {type: categorical, choices: [fp32, int8]}\n")
    (tmp_path / "s.yaml").write_text(body)
    cfg = load_sweep(tmp_path / "s.yaml")
    assert set(cfg.params) == {"distill.alpha", "compress.precision"}
    (tmp_path / "bad.yaml").write_text(body.replace("distill.alpha", "distill.alfa"))
    with pytest.raises(RecsysError, match="distill.alfa"):
        load_sweep(tmp_path / "bad.yaml")


def test_print_config_lists_every_key_with_its_value_and_doc(capsys):
    """`recsys train --print-config`: the resolved config (file + overrides), every key, each with a comment."""
    import dataclasses

    from recsys.cli import main
    from recsys.config import RunConfig

    with pytest.raises(SystemExit) as done:
        main(["train", "--config", str(REPO / "configs" / "ml100k.yaml"), "train.lr=3e-5", "--print-config"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["train"]["lr"] == 3e-5 and yaml.safe_load(out)["data"]["name"] == "ml-100k"
    lines = out.splitlines()
    for section in dataclasses.fields(RunConfig):
        keys = [f.name for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                                   else type(getattr(RunConfig(), section.name)))]
        for key in keys:
            line = next(ln for ln in lines if ln.startswith(f"  {key}:"))
            assert "  # " in line and len(line.split("  # ", 1)[1]) > 5, line  # a one-line doc
