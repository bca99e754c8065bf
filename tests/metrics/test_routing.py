"""Normalised mutual information between domain and chosen expert, against hand-computed values."""

import math

import pytest
import torch

from llama_expert.metrics.routing import normalized_mutual_information


def test_independent_domains_and_experts_give_zero():
    assert normalized_mutual_information(torch.tensor([[10.0, 10.0], [5.0, 5.0]])) == pytest.approx(0.0, abs=1e-12)


def test_each_domain_on_its_own_expert_gives_one():
    assert normalized_mutual_information(torch.tensor([[7.0, 0.0], [0.0, 7.0]])) == pytest.approx(1.0)


def test_a_partial_case_by_hand():
    joint = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    p = joint / joint.sum()
    mutual = sum(p[i, j] * math.log(p[i, j] / (0.5 * 0.5)) for i in range(2) for j in range(2))
    assert normalized_mutual_information(joint) == pytest.approx(float(mutual) / math.log(2))


def test_one_domain_or_one_expert_gives_zero():
    assert normalized_mutual_information(torch.tensor([[4.0, 6.0]])) == 0.0
    assert normalized_mutual_information(torch.tensor([[4.0], [6.0]])) == 0.0
