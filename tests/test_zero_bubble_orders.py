"""zbv and dualpipev compute orders: every (chunk, micro-batch) once, W after its I, and the very
orders torch.distributed.pipelining computes for ScheduleZBVZeroBubble and ScheduleDualPipeV
(torch's overlapped forward-backward pair read as its forward, then its backward)."""
from types import SimpleNamespace

import pytest
from torch.distributed.pipelining import schedules as torch_schedules

from minipipe.schedule.zero_bubble import dualpipev_order, zbv_order


def torch_order(cls, rank, k, m):
    """torch's compute order of `rank` as (letter, local chunk, micro-batch); stage r is local
    chunk 0, stage 2K-1-r local chunk 1 (the V placement)."""
    fake = SimpleNamespace(pp_group_size=k, _n_microbatches=m, num_stages=2 * k)
    steps = []
    for action in cls._calculate_single_rank_operations(fake, rank):
        if action is None:  # torch's idle slot
            continue
        for sub in action.sub_actions or (action,):
            letter = sub.computation_type.value  # F, I, W or B (fused)
            steps.append((letter, 0 if sub.stage_index == rank else 1, sub.microbatch_index))
    return steps


def assert_complete(order, m):
    """F of every (chunk, micro-batch) once, then B once or I once and a later W once."""
    seen = {}
    for position, (letter, chunk, mb) in enumerate(order):
        seen.setdefault((chunk, mb), []).append((letter, position))
    assert sorted(seen) == [(c, i) for c in (0, 1) for i in range(m)]
    for unit, steps in seen.items():
        letters = "".join(letter for letter, _ in steps)
        assert letters in ("FB", "FIW"), (unit, letters)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_zbv_is_complete_and_torch_computes_the_same_order(k):
    for m in range(1, 4 * k + 3):
        for rank in range(k):
            ours = zbv_order(rank, k, m)
            assert_complete(ours, m)
            assert ours == torch_order(torch_schedules.ScheduleZBVZeroBubble, rank, k, m), (rank, k, m)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_dualpipev_is_complete_and_torch_computes_the_same_order(k):
    for m in range(2 * k, 4 * k + 3):
        for rank in range(k):
            ours = dualpipev_order(rank, k, m)
            assert_complete(ours, m)
            assert ours == torch_order(torch_schedules.ScheduleDualPipeV, rank, k, m), (rank, k, m)


def test_zbv_by_hand_at_two_ranks():
    """Rank 1 of 2 (model chunks 1 = c0 and 2 = c1), M = 3, phase by phase as zero_bubble.py
    describes them: 1 warm-up F0; 1 pair F1 F0; 1 triple F1 I1 W1; steady F0 I0 W0 F1 I1 W1
    while chunk 1 trails or micro-batches remain; cool-down 1 pair I0 I1, 1 pair I0 W0; the W's
    left, chunk 1's first."""
    text = " ".join(f"{letter}{mb}c{chunk}" for letter, chunk, mb in zbv_order(1, 2, 3))
    assert text == ("F0c0 F0c1 F1c0 F1c1 I0c1 W0c1 F2c0 I0c0 W0c0 F2c1 I1c1 W1c1 "
                    "I1c0 I2c1 I2c0 W1c0 W2c1 W2c0")
