"""The global batch is a function of (seed, step), identical however it is split."""

import pytest

from launcher.data.batches import BatchPlan
from launcher.errors import UserError


def plan(micro, world, rank, n=100, global_batch=8, seed=3):
    return BatchPlan(num_examples=n, global_batch_size=global_batch, micro_batch_size=micro, world_size=world,
                     rank=rank, seed=seed)


@pytest.mark.parametrize("micro, world", [(8, 1), (4, 1), (4, 2), (2, 2), (1, 4)])
def test_splits_cover_the_same_global_batch(micro, world):
    for step in (0, 5, 12, 13):  # 12 steps per epoch: 13 is in the second epoch
        union = []
        for rank in range(world):
            p = plan(micro, world, rank)
            assert len(p.micro_batches(step)) == 8 // (micro * world)
            assert all(len(mb) == micro for mb in p.micro_batches(step))
            union.extend(i for mb in p.micro_batches(step) for i in mb)
        assert sorted(union) == sorted(plan(8, 1, 0).global_batch(step))


def test_ranks_hold_disjoint_data():
    a = {i for mb in plan(2, 2, 0).micro_batches(0) for i in mb}
    b = {i for mb in plan(2, 2, 1).micro_batches(0) for i in mb}
    assert a and b and not a & b


def test_epochs_reshuffle_and_cover_the_data():
    p = plan(8, 1, 0)
    epoch0 = [i for s in range(12) for i in p.global_batch(s)]
    epoch1 = [i for s in range(12, 24) for i in p.global_batch(s)]
    assert len(set(epoch0)) == 96 and epoch0 != epoch1


def test_too_little_data_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than one global batch"):
        plan(4, 1, 0, n=5)
