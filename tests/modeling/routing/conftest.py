"""Fixtures of the routing tests: an eval-mode noisy top-k router and a batch of 40 tokens for it."""

import pytest
import torch

from llama_expert import NoisyTopKGating

from .helpers import EXPERTS, HIDDEN, TOP_K


@pytest.fixture
def router():
    torch.manual_seed(0)
    return NoisyTopKGating(HIDDEN, EXPERTS, TOP_K).eval()


@pytest.fixture
def hidden():
    torch.manual_seed(1)
    return torch.randn(40, HIDDEN)
