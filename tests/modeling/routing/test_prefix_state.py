"""PrefixState: a pass reads what earlier passes left and never its own writes; the next pass gets both; rows
move as the KV cache's rows move (beam search's reordering, a repeated batch)."""

import torch

from llama_expert.modeling.routing import PrefixState


def test_a_pass_reads_the_state_before_it_and_the_next_pass_reads_its_writes():
    state = PrefixState()
    assert state.read("layer") is None  # new sequences
    state.write("layer", torch.ones(2, 3), torch.tensor([1.0, 1.0]))
    assert state.read("layer") is None
    following = state.following()
    assert torch.equal(following.read("layer")[0], torch.ones(2, 3))
    following.write("layer", torch.full((2, 3), 2.0), torch.tensor([2.0, 2.0]))
    assert torch.equal(following.read("layer")[0], torch.ones(2, 3))
    assert torch.equal(following.following().read("layer")[1], torch.tensor([2.0, 2.0]))


def test_rows_follow_a_reordering_and_a_repetition():
    state = PrefixState({"layer": (torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([3.0, 4.0, 5.0]))})
    state.select(torch.tensor([2, 2, 0]))
    assert state.read("layer")[0].view(-1).tolist() == [2.0, 2.0, 0.0]
    assert state.read("layer")[1].tolist() == [5.0, 5.0, 3.0]
    state.select(torch.tensor([True, False, True]))
    state.repeat_interleave(2)
    assert state.read("layer")[0].view(-1).tolist() == [2.0, 2.0, 0.0, 0.0]
