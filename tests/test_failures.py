"""A broken pipeline fails loudly and quickly: every rank exits with an error naming what it
waited for, within the timeout; impossible layouts are refused before any rank waits."""
import os
import time

import pytest

from minipipe.build import build_run
from minipipe.config import make_config
from tests.spawn import run_workers

TIMEOUT_S = 4.0
CASE = dict(model="transformer", layers=2, d_model=16, heads=2, max_seq_len=8, data="synthetic",
            batch_size=4, microbatches=2, timeout=TIMEOUT_S)


def _sabotaged_worker(rank, world_size, sabotage):
    run = build_run(make_config(**CASE))
    if rank == 0 and sabotage != "dies":
        real_forward = run.stage.forward

        def broken_forward(value, step, microbatch, chunk=0):
            out = real_forward(value, step, microbatch, chunk)
            return out[..., :-1] if sabotage == "narrow" else out[:-1]

        run.stage.forward = broken_forward
    if rank == 1 and sabotage == "dies":
        def die(*args):
            os._exit(1)
        run.stage.forward = die
    inputs, targets = run.dataset.batch(0, 4)
    run.engine.train_step(inputs, targets, 0, 1e-3, 1.0)


@pytest.mark.parametrize("sabotage,receiver_says", [
    ("narrow", "failed on micro-batch 0 received from stage 0 as [((2, 8, 15), 'torch.float32')]"),
    ("short", "activation of micro-batch 0 from stage 0: expected dim 0 = 2"),
])
def test_wrong_shape_from_a_stage_fails_every_rank_within_the_timeout(sabotage, receiver_says):
    started = time.monotonic()
    outcomes = run_workers(_sabotaged_worker, 2, sabotage, expect_failure=True, timeout_s=60)
    elapsed = time.monotonic() - started
    sender, receiver = outcomes
    assert receiver.error == "PipelineError" and receiver_says in receiver.message, receiver
    assert "rank 1" in receiver.message and "stage 1" in receiver.message
    assert sender.error == "PipelineError", sender  # waited for a gradient that never came
    assert "rank 0" in sender.message and "gradient of micro-batch" in sender.message
    assert elapsed < 30


def test_a_dead_stage_makes_the_others_fail_with_what_they_waited_for():
    started = time.monotonic()
    outcomes = run_workers(_sabotaged_worker, 2, "dies", expect_failure=True, timeout_s=60)
    assert outcomes[1].error == "Died"
    survivor = outcomes[0]
    assert survivor.error == "PipelineError", survivor
    assert "rank 0 (stage 0" in survivor.message and "gradient of micro-batch 1" in survivor.message
    assert time.monotonic() - started < 30


def _layout_worker(rank, world_size, overrides):
    build_run(make_config(**dict(CASE, timeout=120.0, **overrides)))


@pytest.mark.parametrize("overrides,needle", [
    (dict(), "more stages than layers"),  # 4 ranks, 4 layers: fine; see below with 5
    (dict(balance="1,1,1"), "--balance"),
    (dict(balance="2,1,0,1"), "--balance"),
])
def test_impossible_layouts_are_refused_before_any_rank_waits(overrides, needle):
    world = 5 if not overrides else 4  # the tiny model has 4 layers
    started = time.monotonic()
    outcomes = run_workers(_layout_worker, world, overrides, expect_failure=True, timeout_s=60)
    for outcome in outcomes:
        assert outcome.error == "ConfigError" and needle in outcome.message, outcome
    assert time.monotonic() - started < 30  # nobody sat in the 120 s timeout


def _dead_peer_in_collective_worker(rank, world_size, where):
    """Rank 1 dies right where it would join the engine's collective: the dp gradient all-reduce
    (dp=2, one stage) or the gradient-norm all-reduce (two stages)."""
    layout = dict(dp=2, stages=1) if where == "dp" else dict(stages=2)
    run = build_run(make_config(**dict(CASE, timeout=20.0, **layout)))
    if rank == 1:
        def die(*args):
            os._exit(1)
        setattr(run.engine, "_allreduce" if where == "dp" else "_update", die)
    run.engine.train_step(*run.dataset.batch(0, 4), 0, 1e-3, 1.0)


@pytest.mark.parametrize("where,collective", [("dp", "data-parallel gradient all-reduce"),
                                              ("norm", "gradient-norm all-reduce")])
def test_a_peer_dying_in_a_collective_is_a_pipeline_error_naming_it(where, collective):
    outcomes = run_workers(_dead_peer_in_collective_worker, 2, where, expect_failure=True, timeout_s=60)
    assert outcomes[1].error == "Died"
    survivor = outcomes[0]
    assert survivor.error == "PipelineError", survivor
    assert f"rank 0 (stage 0), step 0: waiting for the {collective} failed" in survivor.message, survivor.message
    assert "lost the connection (the peer process exited or crashed)" in survivor.message
