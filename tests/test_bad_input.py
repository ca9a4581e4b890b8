"""Bad input through the real CLI: one `error:` line on stderr, exit code 2, no traceback, nothing
half-written.

Most cases call `recsys.cli.main` in-process (fast); a few run `python -m recsys.cli` as a real process to
show the same holds at the process level. Nothing here trains a model: every `recsys train` case fails
before fitting. Known bugs are `xfail(strict=True)`: fixing one turns its test red until the mark goes.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import QUICK_S

from recsys.cli import main

REPO = Path(__file__).resolve().parents[1]


# --- helpers ------------------------------------------------------------------------------------------------


def one_error_line(err: str) -> str:
    """The single `error:` line of `err`, asserting there is exactly one line and no traceback."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one stderr line, got {err!r}"
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: "):].strip(), line
    return line


def fails(capsys, *argv) -> str:
    """Run the CLI in-process; assert exit code 2, one stderr line, empty stdout; return the line."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert rc == 2, (rc, err)
    assert out == "", out
    return line


def assert_contains(line: str, *needles: str) -> None:
    for n in needles:
        assert str(n) in line, f"{n!r} not in {line!r}"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def results(tmp_path) -> Path:
    """A results dir under tmp_path that a failing command must leave without files."""
    r = tmp_path / "results"
    yield r
    assert files_under(r) == [], f"half-written output left in {r}"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


ITEMS = "item_id,text\ni1,hello world\ni2,good night\ni3,third item\n"


def custom(folder: Path, interactions: str | bytes, items: str = ITEMS) -> Path:
    write(folder / "items.csv", items)
    write(folder / "interactions.csv", interactions)
    return folder


# --- config file --------------------------------------------------------------------------------------------


def test_missing_config_file(capsys, tmp_path, results):
    missing = tmp_path / "nope.yaml"
    line = fails(capsys, "train", "--config", missing, f"tracking.results_dir={results}")
    assert_contains(line, "config file not found", str(missing))


@pytest.mark.parametrize("text, lineno", [
    ("train:\n  lr: 1\n  batch_size: : 2\n", 3),  # mapping value where none is allowed
    ("data:\n  name: synthetic\ntrain:\n  lr: 1\n\tbatch_size: 2\n", 5),  # tab indentation
    ("data:\n  name: synthetic\ntrain:\n  lr: 1\n  batch_size: [2\n  epochs: 3\n", 6),  # unclosed flow list
], ids=["colon", "tab", "unclosed"])
def test_invalid_yaml_names_file_and_line(capsys, tmp_path, results, text, lineno):
    cfg = write(tmp_path / "bad.yaml", text)
    line = fails(capsys, "train", "--config", cfg, f"tracking.results_dir={results}")
    assert_contains(line, f"bad.yaml:{lineno}:", "invalid YAML")


@pytest.mark.parametrize("text, needles", [
    ("- data\n- train\n", ["list.yaml", "expected a mapping of sections"]),
    ("just a string\n", ["list.yaml", "expected a mapping of sections"]),
    ("train: 5\n", ["list.yaml", "section 'train' must be a mapping", "int"]),
    ("train:\n  lrr: 0.1\n", ["list.yaml", "unknown key 'train.lrr'", "did you mean 'train.lr'"]),
    ("trainer:\n  lr: 0.1\n", ["list.yaml", "unknown key 'trainer'", "did you mean 'train'"]),
    ("", ["list.yaml", "the file is empty"]),
    ("# only a comment\n", ["list.yaml", "the file is empty"]),
], ids=["list", "scalar", "section-int", "unknown-key", "unknown-section", "empty", "comment-only"])
def test_config_file_structure(capsys, tmp_path, results, text, needles):
    cfg = write(tmp_path / "list.yaml", text)
    line = fails(capsys, "train", "--config", cfg, f"tracking.results_dir={results}")
    assert_contains(line, *needles)


def test_config_file_not_utf8(capsys, tmp_path, results):
    cfg = write(tmp_path / "latin.yaml", b"train:\n  lr: 0.1\n# caf\xe9\n")
    line = fails(capsys, "train", "--config", cfg, f"tracking.results_dir={results}")
    assert_contains(line, "latin.yaml")


@pytest.mark.parametrize("text, lines, key", [
    ("data:\n  name: synthetic\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", (4, 6), "lr"),
    ("train:\n  lr: 0.1\ndata:\n  name: synthetic\ntrain:\n  epochs: 2\n", (1, 5), "train"),
], ids=["key", "section"])
def test_a_duplicated_key_is_refused_with_both_lines(capsys, tmp_path, results, text, lines, key):
    cfg = write(tmp_path / "dup.yaml", text)
    line = fails(capsys, "train", "--config", cfg, f"tracking.results_dir={results}")
    assert_contains(line, f"dup.yaml:{lines[1]}:", f"key '{key}' is given twice", f"lines {lines[0]} and {lines[1]}")


def test_a_merge_key_overridden_beside_it_is_not_a_duplicate(tmp_path):
    from recsys.config import read_yaml

    cfg = write(tmp_path / "merge.yaml", "base: &b\n  lr: 0.1\n  epochs: 2\ntrain:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml(cfg)["train"] == {"lr": 0.2, "epochs": 2}


def alias_bomb(levels: int, width: int = 9) -> str:
    """`[&a [lol × width], &b [*a × width], …]`: a few hundred bytes, width**levels values once expanded."""
    names = [f"l{i}" for i in range(levels)]
    parts = [f"&{names[0]} [{', '.join(['lol'] * width)}]"]
    parts += [f"&{n} [{', '.join([f'*{prev}'] * width)}]" for prev, n in zip(names[:-1], names[1:], strict=True)]
    return f"[{', '.join(parts)}]"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path, results):
    """9 levels (387M values) under a typed key, as a real process: one line, nothing printed of the value."""
    cfg = write(tmp_path / "bomb.yaml", f"data:\n  name: {alias_bomb(9)}\n")
    assert cfg.stat().st_size < 1000
    done = run_process(["train", "--config", str(cfg), f"tracking.results_dir={results}"], tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert_contains(one_error_line(done.stderr), "bomb.yaml:2:", "aliases expand", "100000 values")


def test_an_alias_bomb_in_an_override_or_a_sweep_choice(capsys, tmp_path, results):
    line = fails(capsys, "train", f"data.name={alias_bomb(7)}", f"tracking.results_dir={results}")
    assert_contains(line, "override 'data.name=", "aliases expand")
    assert len(line) < 300
    sweep = write(tmp_path / "sweep.yaml", f"study: s\nbase_config: {REPO / 'configs' / 'synthetic.yaml'}\n"
                                           f"results_dir: {results}\nparams:\n  data.name:\n    type: categorical\n"
                                           f"    choices: {alias_bomb(9)}\n")
    assert_contains(fails(capsys, "sweep", "--config", sweep), "sweep.yaml:7:", "aliases expand")


def test_a_value_of_the_wrong_type_is_shown_short(capsys, results):
    """A value within the alias bound but large (10^4 strings) is named by a short repr, its type and size."""
    line = fails(capsys, "train", f"data.name={alias_bomb(4, width=10)}", f"tracking.results_dir={results}")
    assert_contains(line, "data.name: expected str, got list", "(list of 4)")
    assert len(line) < 200


# --- overrides ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, needles", [
    ("train.lrr=0.1", ["unknown key 'train.lrr'", "did you mean 'train.lr'"]),
    ("trian.lr=0.1", ["unknown key 'trian'", "did you mean 'train'"]),
    ("foo.bar=1", ["unknown key 'foo'", "data", "model", "train", "tracking"]),
    ("train.batch_size=abc", ["train.batch_size", "expected int", "'abc'"]),
    ("train.epochs=1.5", ["train.epochs", "expected int", "1.5"]),
    ("train.lr=abc", ["train.lr", "expected float", "'abc'"]),
    ("train.lr=-1", ["train.lr", "> 0", "-1"]),
    ("train.warmup_ratio=2", ["train.warmup_ratio", "[0.0, 1.0]", "2"]),
    ("model.temperature=0", ["model.temperature", "> 0", "0"]),
    ("model.dropout=1.5", ["model.dropout", "1.5"]),
    ("train.precision=64", ["train.precision", "bf16-mixed", "'64'"]),
    ("model.attn_implementation=flash", ["model.attn_implementation", "sdpa", "'flash'"]),
    ("tracking.wandb=maybe", ["tracking.wandb", "offline", "'maybe'"]),
    ("train.cold_offset=auto", ["train.cold_offset", "val", "'auto'"]),
    ("train.cold_offset_tolerance=1.5", ["train.cold_offset_tolerance", "[0.0, 1.0]", "1.5"]),
    ("tracking.progress_bar=perhaps", ["tracking.progress_bar", "expected bool", "'perhaps'"]),
    ("train.lr.x=1", ["train.lr", "expected float"]),
    ("data.synthetic_users=0", ["data.synthetic_users", "> 0"]),
    ("compress.lambda_latency=-0.5", ["compress.lambda_latency", "[0, inf]", "-0.5"]),
    ("compress.gates=heads", ["compress.gates", "expected a list", "'heads'"]),
    ("compress.gates=[heads,neurons]", ["compress.gates", "unknown gate kind 'neurons'"]),
    ("compress.budget_target=0.5", ["compress", "budget_metric and budget_target go together"]),
    ("nosep", ["override 'nosep'", "section.key=value"]),
    ("=3", ["override '=3'", "section.key=value"]),
    ("train.lr=nan", ["train.lr", "must be a finite number", "nan"]),
    ("train.lr=.inf", ["train.lr", "must be a finite number", "inf"]),
    ("distill.temperature=.nan", ["distill.temperature", "must be a finite number"]),
    ("train=", ["override 'train='", "'train' is a section", "train.<key>=value"]),
    ("train=0", ["override 'train=0'", "'train' is a section"]),
    ("train=false", ["override 'train=false'", "'train' is a section"]),
    (f"tracking.run_name={'r' * 300}", ["tracking.run_name is 300 bytes long", "at most 120"]),
    ("tracking.run_name=a/b", ["tracking.run_name 'a/b' contains '/'", "one folder"]),
    ("tracking.run_name=..", ["tracking.run_name '..' must not start with '.'"]),
    ("tracking.run_name=' '", ["tracking.run_name must not be empty"]),
])
def test_bad_override(capsys, results, override, needles):
    line = fails(capsys, "train", f"tracking.results_dir={results}", override)
    assert_contains(line, *needles)


@pytest.mark.parametrize("overrides, needles", [
    (["compress.gates=[heads]", "compress.budget_metric=latency", "compress.budget_target=1.5"],
     ["compress.budget_target must be in (0, 1]", "1.5"]),
    (["compress.gates=[heads]", "compress.budget_metric=latency", "compress.budget_target=0"],
     ["compress.budget_target must be in (0, 1]"]),
    (["compress.lambda_flops=1"], ["compress", "cost penalties need gates"]),
    (["compress.gates=[heads]", "compress.lambda_flops=1", "compress.budget_metric=flops",
      "compress.budget_target=0.5"], ["penalty mode", "budget mode", "not both"]),
    (["compress.gates=[ffn]", "compress.ffn_group=0"], ["compress.ffn_group", "> 0"]),
    (["compress.gates=[heads]", "compress.recovery=1.0"], ["compress.recovery must be in [0, 1)"]),
    (["compress.recovery=0.3"], ["compress", "recovery fixes a learned structure"]),
    (["compress.gates=[heads]", "compress.importance_init=true"],
     ["compress.importance_init", "set model.init_from to a finished dense run"]),
    (["compress.importance_init=true"], ["compress", "importance_init initialises gates"]),
    (["data.user_max_tokens=4"], ["data.user_max_tokens must be in [8, inf]", "4"]),
    (["data.train_user_max_tokens=7"], ["data.train_user_max_tokens must be in [8, inf]", "7"]),
    (["data.history_items=0"], ["data.history_items must be > 0", "0"]),
])
def test_bad_compress_config(capsys, results, overrides, needles):
    assert_contains(fails(capsys, "train", f"tracking.results_dir={results}", *overrides), *needles)
    assert files_under(results) == []


def test_token_budget_above_the_encoders_maximum(capsys, small_synthetic_args, tmp_path):
    line = fails(capsys, "train", *small_synthetic_args, "data.user_max_tokens=600")
    assert_contains(line, "data.user_max_tokens", "600 tokens", "the encoder reads at most 512")
    assert files_under(tmp_path / "results") == []


def test_gate_group_must_divide_the_ffn(capsys, small_synthetic_args, tmp_path):
    line = fails(capsys, "train", *small_synthetic_args, "compress.gates=[ffn]", "compress.ffn_group=5")
    assert_contains(line, "compress.ffn_group", "5", "does not divide the FFN width 64")
    assert files_under(tmp_path / "results") == []


def test_init_from_a_run_of_another_architecture(capsys, small_synthetic_args, tmp_path, fake_run, tiny_model):
    from dataclasses import asdict

    import torch

    from recsys.config import ModelConfig, TrainConfig
    from recsys.models.two_tower import TwoTowerModule

    ckpt = fake_run / "checkpoints" / "best.ckpt"
    state = TwoTowerModule(asdict(ModelConfig(encoder=tiny_model)), asdict(TrainConfig())).state_dict()
    torch.save({"state_dict": {k: v for k, v in state.items() if "ffn.up" not in k}}, ckpt)
    line = fails(capsys, "train", *small_synthetic_args, f"model.init_from={fake_run}")
    assert_contains(line, "model.init_from", str(ckpt), "has no weight", "ffn.up", "different architecture")
    state["user_tower.encoder.embed.word.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": state}, ckpt)
    line = fails(capsys, "train", *small_synthetic_args, f"model.init_from={fake_run}")
    assert_contains(line, "model.init_from", "embed.word.weight", "shape (3, 3)")
    line = fails(capsys, "train", *small_synthetic_args, f"model.init_from={tmp_path / 'nope'}")
    assert_contains(line, "run not found")
    assert not (tmp_path / "results" / "runs" / "t").exists()


def test_bad_override_with_config_names_the_file(capsys, results):
    cfg = REPO / "configs" / "synthetic.yaml"
    line = fails(capsys, "train", "--config", cfg, f"tracking.results_dir={results}", "train.batch_size=abc")
    assert_contains(line, "synthetic.yaml", "train.batch_size", "expected int")
    # a section replaced by an override would silently discard the file's block
    assert_contains(fails(capsys, "train", "--config", cfg, f"tracking.results_dir={results}", "train="),
                    "'train' is a section")


# --- command line -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needles", [
    (["bogus"], ["invalid choice", "'bogus'", "train"]),
    ([], ["recsys", "required"]),
    (["train", "--bogus"], ["unrecognized arguments", "--bogus"]),
    (["data"], ["recsys data", "action"]),
    (["data", "frobnicate"], ["invalid choice", "'frobnicate'"]),
    (["data", "stats"], ["recsys data stats", "NAME is required"]),
    (["data", "download"], ["recsys data download", "NAME is required"]),
    (["data", "stats", "synthetic", "--seed", "abc"], ["--seed", "invalid int value", "'abc'"]),
    (["evaluate"], ["recsys evaluate", "run"]),
    (["evaluate", "somewhere", "--stage", "train"], ["--stage", "invalid choice", "'train'"]),
])
def test_bad_command_line(capsys, argv, needles):
    assert_contains(fails(capsys, *argv), *needles)


# --- datasets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needles", [
    (["train", "--dataset", "ml100k"], ["unknown dataset 'ml100k'", "did you mean 'ml-100k'"]),
    (["train", "data.name=movielens"], ["unknown dataset 'movielens'", "known:"]),
    (["train", "--dataset", "amazon2018:Bad-Cat"], ["amazon2018:Bad-Cat", "category"]),
    (["train", "--dataset", "custom"], ["custom", "--path"]),
    (["train", "--path", "/somewhere"], ["synthetic", "no path"]),
    (["baselines", "--dataset", "ml100k"], ["unknown dataset 'ml100k'", "did you mean 'ml-100k'"]),
])
def test_bad_dataset_for_commands_that_write(capsys, results, argv, needles):
    assert_contains(fails(capsys, *argv, f"tracking.results_dir={results}"), *needles)


def test_unknown_dataset_for_data_stats(capsys):
    line = fails(capsys, "data", "stats", "ml100k")
    assert_contains(line, "unknown dataset 'ml100k'", "did you mean 'ml-100k'")


def test_missing_data_folder(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = fails(capsys, "data", "stats", "ml-100k", "--data-dir", empty)
    assert_contains(line, str(empty / "ml-100k" / "u.data"), "file not found", "recsys data download ml-100k")
    assert list(empty.iterdir()) == []


def test_missing_file_in_custom_folder(capsys, tmp_path):
    write(tmp_path / "c" / "interactions.csv", "user_id,item_id,timestamp\nu,i1,1\n")
    line = fails(capsys, "data", "stats", "custom", "--path", tmp_path / "c")
    assert_contains(line, "items.csv", "file not found")


@pytest.mark.parametrize("interactions, needles", [
    ("user_id,item_id,timestamp\nu1,i1,100\nu1,i2,notatime\nu1,i3,300\n",
     ["interactions.csv:3:", "bad timestamp", "'notatime'"]),
    ("user_id,item_id,timestamp\nu1,i1,100\nu1,i2,200\nu1,i3,2024-13-45\n",
     ["interactions.csv:4:", "bad timestamp", "'2024-13-45'"]),
    ("user_id,item_id,timestamp\nu1,i1,nan\n", ["interactions.csv:2:", "bad timestamp", "'nan'"]),
    ("user_id,item_id,timestamp\nu1,i1,100\nu1,i2\n", ["interactions.csv:3:", "expected 3 comma-separated"]),
    ("user_id,item_id,timestamp\nu1,i1,100\nu1,i2,200,extra\n", ["interactions.csv:3:", "expected 3"]),
    ("user_id,item_id,timestamp\nu1,i1,100\n,i2,200\n", ["interactions.csv:3:", "empty user_id"]),
    ("user_id,item_id,timestamp\nu1,i1,100\nu1,\"i2,200\n", ["interactions.csv:", "expected 3"]),
    ("user,item,time\nu1,i1,100\n", ["interactions.csv:1:", "header must be user_id,item_id,timestamp",
                                     "missing user_id, item_id, timestamp"]),
    ("user_id,item_id,ts\nu1,i1,100\n", ["interactions.csv:1:", "missing timestamp"]),
    ("user_id,item_id,timestamp\n", ["interactions.csv", "no interactions"]),
    ("", ["interactions.csv:1:", "header must be", "got nothing"]),
], ids=["ts-word", "ts-date", "ts-nan", "short-row", "long-row", "empty-user", "open-quote", "wrong-header",
        "partial-header", "header-only", "empty-file"])
def test_malformed_custom_interactions(capsys, tmp_path, interactions, needles):
    folder = custom(tmp_path / "mine", interactions)
    line = fails(capsys, "data", "stats", "custom", "--path", folder)
    assert_contains(line, str(folder / "interactions.csv"), *needles)


@pytest.mark.parametrize("items, needles", [
    ("item_id,text\ni1,\ni2,   \ni3,\n", ["interactions.csv", "no interactions left", "3 without item text"]),
    ("id,title\ni1,x\n", ["items.csv:1:", "header must be item_id,text"]),
    ("item_id,text\ni1,a\ni2,b\ni1,c\n", ["items.csv:4:", "duplicate item_id 'i1'", "items.csv:2"]),
    ("item_id,text\n,orphan text\n", ["items.csv:2:", "empty item_id"]),
], ids=["all-empty-text", "items-header", "duplicate-item", "empty-item-id"])
def test_malformed_custom_items(capsys, tmp_path, items, needles):
    folder = custom(tmp_path / "mine", "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\nu1,i3,3\n", items)
    assert_contains(fails(capsys, "data", "stats", "custom", "--path", folder), *needles)


def test_custom_not_utf8_names_the_line(capsys, tmp_path):
    folder = custom(tmp_path / "mine", b"user_id,item_id,timestamp\nu1,i1,100\nu\xff1,i2,200\n")
    line = fails(capsys, "data", "stats", "custom", "--path", folder)
    assert_contains(line, "interactions.csv:3:", "UTF-8")


def test_malformed_movielens_row(capsys, tmp_path):
    folder = tmp_path / "data" / "ml-100k"
    write(folder / "u.genre", "unknown|0\nAction|1\n")
    write(folder / "u.item", "1|Heat (1995)|01-Jan-1995||http://x|0|1\n")
    write(folder / "u.data", "1\t1\t5\t10\n2\t1\t3\n")
    line = fails(capsys, "data", "stats", "ml-100k", "--data-dir", tmp_path / "data")
    assert_contains(line, f"{folder / 'u.data'}:2:", "expected 4 tab-separated fields, got 3")


@pytest.mark.parametrize("verb", ["train", "baselines"])
def test_bad_custom_data_writes_no_results(capsys, tmp_path, results, verb):
    folder = custom(tmp_path / "mine", "user_id,item_id,timestamp\nu1,i1,100\nu1,i2,notatime\n")
    line = fails(capsys, verb, "--dataset", "custom", "--path", folder, f"tracking.results_dir={results}")
    assert_contains(line, "interactions.csv:3:", "'notatime'")


def test_too_few_interactions_to_evaluate(capsys, tmp_path, results):
    folder = custom(tmp_path / "mine", "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\nu2,i3,3\n")
    line = fails(capsys, "baselines", "--dataset", "custom", "--path", folder,
                 f"tracking.results_dir={results}")
    assert_contains(line, "custom", "3 interactions")


def test_unknown_baseline(capsys, results):
    line = fails(capsys, "baselines", "--models", "popularity,nope", f"tracking.results_dir={results}",
                 "data.synthetic_users=50", "data.synthetic_items=60")
    assert_contains(line, "unknown baseline 'nope'", "popularity", "ease")


# --- models -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory, tiny_model) -> str:
    """A tiny DistilBERT checkpoint with a working tokenizer: loads, but is not a BERT."""
    from transformers import DistilBertConfig, DistilBertModel

    path = tmp_path_factory.mktemp("distilbert")
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64)
    DistilBertModel(cfg).save_pretrained(path)
    for f in Path(tiny_model).iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, path / f.name)
    return str(path)


def test_train_with_missing_model_dir(capsys, small_synthetic_args, tmp_path):
    results = tmp_path / "results"  # small_synthetic_args' results dir
    line = fails(capsys, "train", *small_synthetic_args, "model.encoder=/nonexistent/model")
    assert_contains(line, "/nonexistent/model", "does not exist")
    assert files_under(results) == []


def test_train_with_model_path_that_is_a_file(capsys, small_synthetic_args, tmp_path):
    f = write(tmp_path / "weights.bin", b"\0" * 16)
    line = fails(capsys, "train", *small_synthetic_args, f"model.encoder={f}")
    assert_contains(line, str(f), "is a file")
    assert files_under(tmp_path / "results") == []


def test_train_with_model_dir_without_model(capsys, small_synthetic_args, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    line = fails(capsys, "train", *small_synthetic_args, f"model.encoder={empty}")
    assert_contains(line, str(empty), "no config.json in this folder")
    assert files_under(tmp_path / "results") == []


def cut_model(tiny_model: str, dest: Path, where: str) -> Path:
    """A copy of the tiny model whose model.safetensors is cut short: in its header, or in its tensors' bytes."""
    shutil.copytree(tiny_model, dest)
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:20] if where == "header" else data[: len(data) * 2 // 3])
    return weights


@pytest.mark.parametrize("where", ["header", "body"])
def test_a_truncated_safetensors_file_is_one_line_naming_it(capsys, small_synthetic_args, tmp_path, tiny_model,
                                                           where):
    weights = cut_model(tiny_model, tmp_path / "cut_model", where)
    line = fails(capsys, "train", *small_synthetic_args, f"model.encoder={weights.parent}")
    assert_contains(line, str(weights), "truncated or corrupt")
    assert files_under(tmp_path / "results") == []
    assert_contains(fails(capsys, "profile", "--encoder", weights.parent), str(weights), "truncated or corrupt")


def model_with_vocab(tiny_model: str, dest: Path, vocab: list[str] | None) -> Path:
    """A copy of the tiny model without its tokenizer files, and with `vocab` as its vocab.txt (None: none)."""
    shutil.copytree(tiny_model, dest)
    for name in ("vocab.txt", "tokenizer.json"):
        (dest / name).unlink(missing_ok=True)
    if vocab is not None:
        (dest / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return dest


@pytest.mark.parametrize("vocab, needles", [
    (None, ["5-token vocabulary", "vocab.txt or tokenizer.json"]),
    (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"zq{i}" for i in range(300))],
     ["encodes a plain English sentence to [UNK] only"]),
], ids=["no-vocab", "all-unknown"])
def test_a_tokenizer_that_knows_no_words_is_refused(capsys, small_synthetic_args, tmp_path, tiny_model, vocab,
                                                    needles):
    folder = model_with_vocab(tiny_model, tmp_path / "no_words", vocab)
    line = fails(capsys, "train", *small_synthetic_args, f"model.encoder={folder}")
    assert_contains(line, str(folder), *needles)
    assert files_under(tmp_path / "results") == []


def test_profile_goes_through_the_same_model_check(capsys, distilbert_dir, tmp_path):
    line = fails(capsys, "profile", "--encoder", distilbert_dir)
    assert_contains(line, distilbert_dir, "unsupported architecture 'distilbert'")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    assert_contains(fails(capsys, "profile", "--encoder", empty), "no config.json")


def test_train_with_unsupported_architecture(capsys, small_synthetic_args, tmp_path, distilbert_dir):
    line = fails(capsys, "train", *small_synthetic_args, f"model.encoder={distilbert_dir}")
    assert_contains(line, distilbert_dir, "unsupported architecture 'distilbert'", "bert")
    assert files_under(tmp_path / "results") == []


@pytest.mark.parametrize("override", ["train.devices=abc", "train.accelerator=tpu_please"])
def test_train_with_bad_trainer_option(capsys, small_synthetic_args, tmp_path, override):
    line = fails(capsys, "train", *small_synthetic_args, override)
    assert_contains(line, override.split("=")[0])
    assert files_under(tmp_path / "results") == []


# --- evaluate -----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_run(tmp_path, small_synthetic_args) -> Path:
    """A run folder with a valid config.yaml (tiny model, small synthetic data) and no checkpoint yet."""
    from recsys.config import load_config, save_config

    run = tmp_path / "results" / "runs" / "fake"
    (run / "checkpoints").mkdir(parents=True)
    save_config(load_config(None, small_synthetic_args), run / "config.yaml")
    return run


def test_evaluate_missing_run(capsys, tmp_path):
    line = fails(capsys, "evaluate", tmp_path / "runs" / "nope")
    assert_contains(line, "run not found", str(tmp_path / "runs" / "nope"))


def test_evaluate_folder_without_config(capsys, tmp_path):
    write(tmp_path / "run" / "checkpoints" / "best.ckpt", b"x")
    line = fails(capsys, "evaluate", tmp_path / "run")
    assert_contains(line, str(tmp_path / "run"), "no config.yaml")


def test_evaluate_takes_a_run_folder_not_a_loose_checkpoint(capsys, fake_run, tmp_path):
    loose = write(tmp_path / "somewhere" / "model.ckpt", b"x")
    assert_contains(fails(capsys, "evaluate", loose), str(loose), "is a file", "give the run folder")
    assert_contains(fails(capsys, "evaluate", fake_run / "config.yaml"), "is a file", "give the run folder")


def test_evaluate_run_without_checkpoint(capsys, fake_run):
    line = fails(capsys, "evaluate", fake_run)
    assert_contains(line, str(fake_run / "checkpoints" / "best.ckpt"), "missing")


@pytest.mark.parametrize("target", ["folder", "ckpt"])
@pytest.mark.parametrize("content", [b"garbage, not a checkpoint\n" * 10, b""], ids=["garbage", "empty"])
def test_evaluate_corrupt_checkpoint(capsys, fake_run, target, content):
    ckpt = write(fake_run / "checkpoints" / "best.ckpt", content)
    before = sorted(fake_run.rglob("*"))
    line = fails(capsys, "evaluate", fake_run if target == "folder" else ckpt)
    assert_contains(line, str(ckpt), "corrupt")
    assert sorted(fake_run.rglob("*")) == before


def test_evaluate_checkpoint_without_state_dict(capsys, fake_run):
    import torch

    ckpt = fake_run / "checkpoints" / "best.ckpt"
    torch.save({"epoch": 1}, ckpt)
    assert_contains(fails(capsys, "evaluate", fake_run), str(ckpt), "corrupt", "KeyError")


def test_evaluate_checkpoint_of_another_model(capsys, fake_run):
    import torch

    ckpt = fake_run / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": {"user_tower.encoder.embed.word.weight": torch.zeros(3, 3)}}, ckpt)
    assert_contains(fails(capsys, "evaluate", fake_run), str(ckpt), "weights do not match")


def test_evaluate_run_with_bad_config(capsys, fake_run):
    write(fake_run / "checkpoints" / "best.ckpt", b"x")
    cfg = fake_run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("batch_size: 32", "batch_sise: 32"))
    line = fails(capsys, "evaluate", fake_run)
    assert_contains(line, str(cfg), "unknown key 'train.batch_sise'", "did you mean 'train.batch_size'")


# --- download -----------------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A loopback HTTP server; yields (the folder it serves, its base URL)."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def zip_of(path: Path, members: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return hashlib.md5(path.read_bytes()).hexdigest()


GOOD = {"ml-100k/u.data": "1\t1\t5\t10\n", "ml-100k/u.item": "1|A|x||u|0\n", "ml-100k/u.genre": "unknown|0\n"}


TQDM_BAR = re.compile(r"^[\w.\-]+: +\d+%\|")


def without_progress_bars(err: str) -> str:
    """`err` less tqdm's download bars (redrawn with \\r, ended by \\n), which are not error lines."""
    return "".join(ln for ln in re.split(r"(?<=\n)", err.replace("\r", "\n")) if not TQDM_BAR.match(ln)
                   and ln != "\n")


def download_case(root: Path, base: str, case: str):
    """Serve ml-100k.zip broken as `case`; return (its Source, needles the error line must contain)."""
    from recsys.data.download import Source

    url = f"{base}/ml-100k.zip"
    md5 = None
    if case == "escaping-member":
        zip_of(root / "ml-100k.zip", {**GOOD, "ml-100k/../../evil.txt": "gotcha"})
        needles = [url, "refusing archive member 'ml-100k/../../evil.txt'", "escapes the target folder"]
    elif case == "absolute-member":
        zip_of(root / "ml-100k.zip", {**GOOD, "/tmp/evil.txt": "gotcha"})
        needles = [url, "refusing archive member '/tmp/evil.txt'", "absolute path"]
    elif case == "checksum":
        real = zip_of(root / "ml-100k.zip", GOOD)
        md5 = "0" * 32
        needles = ["checksum mismatch", url, md5, real]
    elif case == "not-a-zip":
        write(root / "ml-100k.zip", b"<html>not a zip</html>")
        needles = [url, "cannot unpack"]
    else:
        needles = [url, "HTTP 404"]
    return Source(url, md5), needles


@pytest.mark.parametrize("case", ["escaping-member", "absolute-member", "checksum", "not-a-zip", "http-404"])
def test_download_refuses_and_leaves_nothing(capsys, tmp_path, server, monkeypatch, case):
    from recsys.data import download

    source, needles = download_case(*server, case)
    monkeypatch.setitem(download.URLS, "ml-100k", [source])  # configuration: where ml-100k is fetched from
    data = tmp_path / "data"
    rc = main(["data", "download", "ml-100k", "--data-dir", str(data)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    line = one_error_line(without_progress_bars(err))
    assert rc == 2 and out == ""
    assert_contains(line, *needles)
    assert not data.exists()  # no data folder, no dataset folder, no temp folder, no .part
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "served" / "evil.txt").exists()


def test_download_error_is_the_only_stderr_line(capsys, tmp_path, server, monkeypatch):
    from recsys.data import download

    source, needles = download_case(*server, "checksum")
    monkeypatch.setitem(download.URLS, "ml-100k", [source])
    assert_contains(fails(capsys, "data", "download", "ml-100k", "--data-dir", tmp_path / "data"), *needles)


def test_download_not_downloadable(capsys, tmp_path):
    line = fails(capsys, "data", "download", "custom", "--data-dir", tmp_path / "data")
    assert_contains(line, "'custom'", "cannot be downloaded", "ml-100k")
    assert files_under(tmp_path / "data") == []


def test_download_into_a_file(capsys, tmp_path):
    f = write(tmp_path / "not_a_dir", "x")
    line = fails(capsys, "data", "download", "ml-100k", "--data-dir", f)
    assert_contains(line, str(f))


# --- real processes -----------------------------------------------------------------------------------------


def run_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([sys.executable, "-m", "recsys.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=QUICK_S)


def test_process_unknown_key(tmp_path):
    p = run_process(["train", "train.lrr=0.1", f"tracking.results_dir={tmp_path / 'results'}"], tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert_contains(one_error_line(p.stderr), "train.lrr", "did you mean 'train.lr'")
    assert files_under(tmp_path / "results") == []


def test_process_malformed_custom_row(tmp_path):
    folder = custom(tmp_path / "mine", "user_id,item_id,timestamp\nu1,i1,100\nu1,i2,notatime\n")
    p = run_process(["data", "stats", "custom", "--path", folder], tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert_contains(one_error_line(p.stderr), "interactions.csv:3:", "'notatime'")


def test_process_train_bad_model_path(tmp_path, small_synthetic_args):
    p = run_process(["train", *small_synthetic_args, "model.encoder=/nonexistent/model"], tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert_contains(one_error_line(p.stderr), "/nonexistent/model", "does not exist")
    assert files_under(tmp_path) == []  # nothing under results/ (nor anywhere else in the working folder)


# --- run names, dropped items, noise ---------------------------------------------------------------------------


def test_a_taken_run_name_destroys_nothing(capsys, small_synthetic_args, tmp_path):
    """A finished run is replaced only with tracking.overwrite=true; a name being written (locked) is refused
    without touching its staging folder."""
    from filelock import FileLock

    assert main(["train", *small_synthetic_args]) == 0
    capsys.readouterr()
    run = tmp_path / "results" / "runs" / "t"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    line = fails(capsys, "train", *small_synthetic_args)
    assert_contains(line, f"run {run} exists", "tracking.run_name", "tracking.overwrite=true")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    staging = write(tmp_path / "results" / "runs" / "other.partial" / "checkpoints" / "x.ckpt", b"in progress")
    with FileLock(str(tmp_path / "results" / "runs" / "other.lock")):  # another process is writing "other"
        line = fails(capsys, "train", *[a for a in small_synthetic_args if not a.startswith("tracking.run_name")],
                     "tracking.run_name=other")
    assert_contains(line, "other", "is being written by another process")
    assert staging.read_bytes() == b"in progress"
    assert main(["train", *small_synthetic_args, "tracking.overwrite=true", "train.seed=1"]) == 0
    assert (run / "config.yaml").read_text() != before[run / "config.yaml"].decode()


def test_interactions_with_items_without_text_are_counted_aloud(capsys, tmp_path):
    items = "item_id,text\ni1,hello world\ni2,good night\ni3,third item\ni4,\n"
    rows = "".join(f"u{u},i{1 + (u + k) % 3},{10 * k}\n" for u in range(4) for k in range(3)) + "u0,i4,99\nu1,i4,98\n"
    folder = custom(tmp_path / "mine", "user_id,item_id,timestamp\n" + rows, items)
    rc = main(["baselines", "--dataset", "custom", "--path", str(folder), "--models", "popularity",
               f"tracking.results_dir={tmp_path / 'results'}"])
    err = capsys.readouterr().err
    assert rc == 0
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert warnings == ["warning: dataset 'custom': 2 interactions dropped because their item has no text "
                        "(3 items with text kept)"]


def test_targets_masked_by_their_own_history_are_counted_aloud(capsys, tmp_path):
    """Duplicated (user, item, timestamp) rows make each test target its user's validation item, which test
    evaluation masks: `data stats` gives the share, and every command that evaluates warns in one line first."""
    rows = "".join(f"u{u},i{1 + u % 3},10\nu{u},i{1 + (u + 1) % 3},20\nu{u},i{1 + (u + 2) % 3},30\n" * 2
                   for u in range(6))
    folder = custom(tmp_path / "dup", "user_id,item_id,timestamp\n" + rows)
    assert main(["data", "stats", "custom", "--path", str(folder)]) == 0
    out, err = capsys.readouterr()
    stats = dict(line.split(None, 1) for line in out.splitlines())
    assert float(stats["masked_targets_test"]) == 1.0 and float(stats["masked_targets_val"]) == 0.0  # c,c at the end
    assert stats["evaluated_users"].strip() == "6"
    (warning,) = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert_contains(warning, "dataset 'custom'", "own history", "test 100% (6 of 6)")
    rc = main(["baselines", "--dataset", "custom", "--path", str(folder), "--models", "popularity",
               f"tracking.results_dir={tmp_path / 'results'}"])
    out, err = capsys.readouterr()
    assert rc == 0 and len([ln for ln in err.splitlines() if "own history" in ln]) == 1
    clean = custom(tmp_path / "clean", "user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{1 + u % 3},10\nu{u},i{1 + (u + 1) % 3},20\nu{u},i{1 + (u + 2) % 3},30\n" for u in range(6)))
    assert main(["data", "stats", "custom", "--path", str(clean)]) == 0
    out, err = capsys.readouterr()
    assert float(dict(line.split(None, 1) for line in out.splitlines())["masked_targets_test"]) == 0.0
    assert "own history" not in err


def test_commands_start_without_third_party_noise(tmp_path, small_synthetic_args):
    """A training run prints none of torchao's, torch's or Lightning's known noise unless --verbose."""
    noise = ("Failed to load", "register_constant", "litlogger", "LeafSpec", "GPU available")
    quiet = run_process(["train", *small_synthetic_args], tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert not [n for n in noise if n in quiet.stdout + quiet.stderr]
    loud = run_process(["--verbose", "train", *small_synthetic_args, "tracking.overwrite=true"], tmp_path)
    assert loud.returncode == 0 and any(n in loud.stdout + loud.stderr for n in noise)


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: writing a run there fills it (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, small_synthetic_args, full_disk):
    args = [a for a in small_synthetic_args if not a.startswith("tracking.results_dir")]
    line = fails(capsys, "train", *args, f"tracking.results_dir={full_disk / 'results'}")
    assert_contains(line, "No space left on device", "nothing half-written was kept")
    assert files_under(full_disk / "results") == []
