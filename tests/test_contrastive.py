"""In-batch softmax loss against exact numbers."""
import math

import pytest
import torch

from recsys.losses.contrastive import InBatchSoftmaxLoss


def test_exact_value_two_by_two():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    i = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits / t=0.5: row 0 = [2, 1.2], row 1 = [0, 1.6]
    expected = 0.5 * (-2 + math.log(math.exp(2) + math.exp(1.2)) - 1.6 + math.log(1 + math.exp(1.6)))
    assert InBatchSoftmaxLoss()(u, i, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_false_negatives_are_removed_but_the_positive_stays():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    i = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # one extra negative
    fn = torch.tensor([[True, True, False], [False, True, True]])  # diagonal flags must be ignored
    # row 0 keeps columns {0, 2}: logits [2, 0]; row 1 keeps {0, 1}: logits [0, 1.6]
    expected = 0.5 * (-2 + math.log(math.exp(2) + 1) - 1.6 + math.log(1 + math.exp(1.6)))
    assert InBatchSoftmaxLoss()(u, i, 0.5, fn).item() == pytest.approx(expected, rel=1e-6)


def test_gradient_flows_to_both_towers():
    u = torch.randn(4, 8, requires_grad=True)
    i = torch.randn(6, 8, requires_grad=True)
    InBatchSoftmaxLoss()(u, i, 0.1, torch.zeros(4, 6, dtype=torch.bool)).backward()
    assert u.grad.abs().sum() > 0 and i.grad.abs().sum() > 0
