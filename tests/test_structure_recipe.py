"""The combined-loss recipe's options (issue: the λ search must earn its keep): importance-initialised gates,
a frozen item tower with cached catalog embeddings, the reference served at its tuned input length, and the
post-hoc twin searching the same input knobs."""
import json

import pytest
import torch
from conftest import fresh_module, tiny_run_args, train_run

from recsys.models.importance import importance_scores, keep_mask, rank_log_alpha

GATES = "compress.gates=[heads,ffn,blocks,output]"


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("recipe")
    args = tiny_run_args(tiny_model, tmp)
    return train_run(args, tmp, "dense"), args, tmp


def test_rank_log_alpha_spreads_by_rank_only():
    scores = torch.tensor([[5.0, 1.0, 3.0], [0.5, 400.0, 2.0]])
    la = rank_log_alpha(scores, init=4.0, spread=3.0)
    # ranks 0..5 → 2.5 + 3·rank/5, whatever the scores' scale
    assert la.flatten().tolist() == pytest.approx([4.9, 3.1, 4.3, 2.5, 5.5, 3.7])
    assert rank_log_alpha(scores, 4.0, 0.0).eq(4.0).all()  # no spread: every gate at init


def test_importance_init_orders_gates_as_posthoc_pruning_would(dense, tiny_model):
    """Step 0 of an importance-initialised run: every gated kind's log α follows the dense model's importance
    order (the same scores the post-hoc baseline ranks), within init ± spread/2; the model is still dense."""
    from itertools import islice

    from recsys.config import load_config
    from recsys.models.encoder import load_tokenizer
    from recsys.recipes.train import prepare_module

    run, args, _ = dense
    cfg = load_config(None, [*args, GATES, f"model.init_from={run}",
                             "compress.importance_init=true", "compress.gate_init=4.0", "compress.prune_batches=2",
                             "compress.lambda_flops=1.0"])
    tok = load_tokenizer(tiny_model)

    def fresh():
        return fresh_module(cfg, run, tok)

    module, dm = fresh()
    prepare_module(module, dm, cfg)
    gates = module.user_tower.gates
    ref_module, ref_dm = fresh()  # the post-hoc baseline's scores, computed apart on the same batches
    scores = importance_scores(ref_module, list(islice(ref_dm.train_dataloader(), 2)),
                               ("heads", "ffn", "attn_block", "ffn_block", "output"))
    assert set(scores) == {"heads", "ffn", "attn_block", "ffn_block", "output"}
    for kind, s in scores.items():
        la = getattr(gates, kind).log_alpha.detach()
        assert torch.equal(torch.argsort(la.flatten(), stable=True), torch.argsort(s.flatten(), stable=True)), kind
        assert la.min() == pytest.approx(2.5) and la.max() == pytest.approx(5.5)
        # the units post-hoc pruning at 50% keeps are exactly the gates above the median
        keep = keep_mask(s, 0.5)
        assert (la[keep].min() > la[~keep].max()), kind
    assert gates.kept()["heads"].eq(1).all() and gates.kept()["ffn"].eq(1).all()  # ẑ = 1 everywhere at step 0


def test_importance_initialised_run_trains_end_to_end(dense, capsys):
    run, args, tmp = dense
    out = train_run(args, tmp, "imp", GATES, f"model.init_from={run}",
                 "compress.importance_init=true", "compress.prune_batches=2", "compress.budget_metric=flops",
                 "compress.budget_target=0.5", "compress.gate_lr=0.5", "compress.lagrangian_lr=0.5")
    assert "gates initialised by importance" in capsys.readouterr().out
    structure = json.loads((out / "metrics.json").read_text())["structure"]
    assert structure["user_ratios"]["flops"] < 1.0


def test_frozen_item_tower_trains_the_user_tower_only(dense):
    """model.freeze_item_tower: the item tower keeps the dense run's weights exactly, its catalog embeddings
    are encoded once and looked up, and the run evaluates the same through the tower as through the cache."""
    from recsys.recipes.evaluate import evaluate_run
    from recsys.runs import load_run

    run, args, tmp = dense
    out = train_run(args, tmp, "frozen", f"model.init_from={run}", "model.freeze_item_tower=true")
    _, before = load_run(run)
    cfg, after = load_run(out)
    assert after.separate and after.item_tower is not after.user_tower
    for (k, a), b in zip(after.item_tower.state_dict().items(), before.item_tower.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert any(not torch.equal(a, b) for a, b in zip(after.user_tower.state_dict().values(),
                                                         before.user_tower.state_dict().values(), strict=True))
    metrics = json.loads((out / "metrics.json").read_text())
    assert evaluate_run(out, "val", progress=False).metrics["ndcg@10"] == pytest.approx(metrics["val"]["ndcg@10"])


def test_frozen_item_batches_carry_no_item_tokens(dense, tiny_model):
    from recsys.config import load_config
    from recsys.data.registry import load_data
    from recsys.models.datamodule import RecDataModule
    from recsys.models.encoder import load_tokenizer

    _, args, _ = dense
    cfg = load_config(None, args)
    ds, split = load_data(cfg.data)
    dm = RecDataModule(ds, split, load_tokenizer(tiny_model), cfg.data, cfg.train, tokenize_items=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["item"] is None and batch["items"].shape[0] == batch["user"]["input_ids"].shape[0]


def test_reference_is_evaluated_and_measured_at_its_overrides(dense, tiny_model):
    from recsys.recipes.evaluate import evaluate_run
    from recsys.search.objectives import reference_costs
    from recsys.search.study import ParamSpec, SweepConfig

    run, _, tmp = dense
    cfg = SweepConfig(study="ref", base_config="configs/synthetic.yaml", params={"train.lr": ParamSpec(low=1e-4,
                      high=1e-3)}, reference_run=str(run), results_dir=str(tmp / "sw"),
                      reference_overrides=["data.user_max_tokens=16", "data.history_items=2"])
    ref = reference_costs(cfg)
    short = evaluate_run(run, "val", progress=False, overrides=cfg.reference_overrides).metrics
    assert ref["ndcg@10"] == pytest.approx(short["ndcg@10"])
    assert ref["overrides"] == cfg.reference_overrides
    full = json.loads((run / "metrics.json").read_text())["val"]
    assert short != full  # shorter user texts rank differently (the override reached the evaluation)


def test_posthoc_twin_searches_the_same_input_knobs():
    from recsys.search.posthoc import posthoc_config
    from recsys.search.study import ParamSpec, SweepConfig

    tokens = ParamSpec(type="categorical", choices=[16, 32])
    cfg = SweepConfig(base_config="x.yaml", params={"compress.budget_target": ParamSpec(low=0.1, high=0.9),
                                                    "data.user_max_tokens": tokens},
                      overrides=["compress.budget_metric=latency", "compress.importance_init=true", "train.lr=1e-4"])
    post = posthoc_config(cfg)
    assert set(post.params) == {"compress.prune_ratio", "data.user_max_tokens"}
    assert post.params["data.user_max_tokens"] == tokens
    assert "train.lr=1e-4" in post.overrides
    assert not any(o.startswith(("compress.budget_", "compress.importance_")) for o in post.overrides)
