"""The data schedule: each epoch's blocks dealt across the data-parallel ranks, every block once, the same deal for
the same step."""

import torch

from llama_expert.training.schedule import block_rows


def test_block_rows_partition_each_epoch_across_ranks():
    num_blocks, batch, world = 24, 3, 2
    seen = []
    for micro in range(num_blocks // (batch * world)):
        for rank in range(world):
            seen += block_rows(0, micro, 1, batch, rank, world, num_blocks, seed=7).tolist()
    assert sorted(seen) == list(range(num_blocks))
    assert torch.equal(block_rows(5, 1, 2, batch, 1, world, num_blocks, 7),
                       block_rows(5, 1, 2, batch, 1, world, num_blocks, 7))
