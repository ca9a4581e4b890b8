"""Shared fixtures: offline hub, W&B disabled, a tiny real BERT checkpoint with MiniLM's tokenizer."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RECSYS_CACHE"] = __import__("tempfile").mkdtemp(prefix="recsys-test-cache-")  # latency tables

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"
# Hang guards, never speed checks (issue 25 A3): pytest-timeout (setup.cfg) and every wait on a child process that
# trains stop a test only when it has plainly hung. Sized for a machine 5x slower than a quiet CI runner, where the
# slowest test (an end-to-end benchmark) takes a few minutes; a child that only checks its input gets QUICK_S.
HANG_S = 3600
QUICK_S = 600


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-layer BERT (hidden 32, 4 heads, FFN 64) with the real MiniLM WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recsys.models.encoder import resolve_model_path

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_model")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_run_args(tiny_model: str, root: Path) -> list[str]:
    """Overrides for a fast end-to-end run: small synthetic data, tiny BERT, results under root/results."""
    return [f"model.encoder={tiny_model}", "data.synthetic_users=120", "data.synthetic_items=150",
            "data.user_max_tokens=32", "data.item_max_tokens=16", "train.epochs=2", "train.batch_size=32",
            "train.examples_per_user=2", "train.lr=1e-3", f"tracking.results_dir={root / 'results'}",
            "tracking.progress_bar=false", "tracking.wandb=disabled"]


@pytest.fixture
def small_synthetic_args(tmp_path, tiny_model) -> list[str]:
    """`tiny_run_args` under tmp_path, as run `t`."""
    return [*tiny_run_args(tiny_model, tmp_path), "tracking.run_name=t"]


def train_run(args: list[str], root: Path, name: str, *extra: str) -> Path:
    """`recsys train` in-process as run `name` (any run name in `args` replaced); its folder under root/results."""
    from recsys.cli import main

    args = [a for a in args if not a.startswith("tracking.run_name")]
    assert main(["train", *args, f"tracking.run_name={name}", *extra]) == 0
    return root / "results" / "runs" / name


def fresh_module(cfg, run: Path, tokenizer):
    """A seeded TwoTowerModule of `cfg` with `run`'s weights and its data module: the state a training run's
    `prepare_module` starts from (tests compare two such modules prepared apart on the same batches)."""
    from dataclasses import asdict

    import torch

    from recsys.data.registry import load_data
    from recsys.models.datamodule import RecDataModule
    from recsys.models.two_tower import TwoTowerModule
    from recsys.runs import init_weights

    ds, split = load_data(cfg.data)
    torch.manual_seed(0)
    module = TwoTowerModule(asdict(cfg.model), asdict(cfg.train), asdict(cfg.compress))
    init_weights(module, run)
    return module, RecDataModule(ds, split, tokenizer, cfg.data, cfg.train)
