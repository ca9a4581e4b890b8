"""Metric code against hand-computed examples: ties, masked targets, the formulas, paired comparison."""
import math

import numpy as np
import pytest
import torch

from recsys.retrieval.metrics import compare, per_user_metrics, rank_of_targets, summarize


def test_rank_counts_higher_scores_and_lower_index_ties():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9, 0.5]])
    mask = torch.zeros(1, 5, dtype=torch.bool)
    # target 2 (score .5): item 3 (.9) is higher, item 1 (.5) ties with a smaller index -> rank 2;
    # item 4 (.5) ties with a larger index and ranks behind
    assert rank_of_targets(scores, torch.tensor([2]), mask).tolist() == [2.0]
    assert rank_of_targets(scores, torch.tensor([1]), mask).tolist() == [1.0]
    assert rank_of_targets(scores, torch.tensor([4]), mask).tolist() == [3.0]
    assert rank_of_targets(scores, torch.tensor([3]), mask).tolist() == [0.0]


def test_masked_items_never_outrank_and_masked_target_is_a_miss():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.9, 0.8, 0.1, 0.7]])
    mask = torch.tensor([[True, True, False, False], [False, True, False, False]])
    ranks = rank_of_targets(scores, torch.tensor([3, 1]), mask)
    assert ranks[0].item() == 0.0  # items 0, 1 masked: target 3 is first
    assert math.isinf(ranks[1].item())  # target itself masked: a miss


def test_all_equal_scores_rank_by_index():
    scores = torch.zeros(3, 6)
    ranks = rank_of_targets(scores, torch.tensor([0, 3, 5]), torch.zeros(3, 6, dtype=torch.bool))
    assert ranks.tolist() == [0.0, 3.0, 5.0]


def test_metric_formulas_by_hand():
    pu = per_user_metrics(np.array([0, 1, 9, 10, 19, np.inf]))
    assert pu["recall@10"].tolist() == [1, 1, 1, 0, 0, 0]
    assert pu["recall@20"].tolist() == [1, 1, 1, 1, 1, 0]
    np.testing.assert_allclose(pu["ndcg@10"], [1.0, 1 / math.log2(3), 1 / math.log2(11), 0, 0, 0])
    np.testing.assert_allclose(pu["ndcg@20"][3:], [1 / math.log2(12), 1 / math.log2(21), 0])
    np.testing.assert_allclose(pu["mrr@10"], [1.0, 0.5, 0.1, 0, 0, 0])
    means = summarize(pu)
    assert means["recall@10"] == pytest.approx(0.5)
    assert means["mrr@10"] == pytest.approx(1.6 / 6)


def test_compare_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    a = rng.random(400)
    better = compare(a, a + 0.05 + rng.normal(0, 0.01, 400))
    assert better["diff"] == pytest.approx(0.05, abs=0.005)
    assert better["ci_low"] > 0 and better["p_ttest"] < 1e-6 and better["p_wilcoxon"] < 1e-6
    same = compare(a, a)
    assert same["diff"] == 0 and same["p_ttest"] == 1.0
    with pytest.raises(ValueError):
        compare(a, a[:10])
