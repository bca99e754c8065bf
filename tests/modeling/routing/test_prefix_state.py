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


def test_a_static_state_follows_as_the_state_does_in_the_same_buffers():
    """StaticPrefixState (a CUDA graph's decode steps): the same sums pass after pass as PrefixState gives, written
    in place, so every pass reads and writes the same addresses; reading never sees the pass's own writes."""
    from llama_expert.modeling.routing import StaticPrefixState

    dynamic = PrefixState({"layer": (torch.ones(2, 3), torch.tensor([1.0, 2.0]))})
    static = StaticPrefixState(dynamic.before)
    addresses = [t.data_ptr() for pair in (static.read("layer"), static.after["layer"]) for t in pair]
    for step in range(3):
        for state in (dynamic, static):
            total, count = state.read("layer")
            state.write("layer", total + step, count + 1)
            assert torch.equal(state.read("layer")[0], total)  # not its own write
        dynamic, static = dynamic.following(), static.following()
        assert all(torch.equal(a, b) for a, b in zip(dynamic.read("layer"), static.read("layer")))
    assert [t.data_ptr() for pair in (static.read("layer"), static.after["layer"]) for t in pair] == addresses
    static.select(torch.tensor([1, 0]))  # beam search's reordering: in place
    assert static.read("layer")[1].tolist() == dynamic.read("layer")[1].flip(0).tolist()
    assert static.read("layer")[0].data_ptr() == addresses[0]
