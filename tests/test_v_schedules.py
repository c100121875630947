"""The V placement and its schedules: rank r holds model chunks r and 2K-1-r, so chunks K-1 and K
hand over in memory on rank K-1 and the loss is on rank 0; zbv and dualpipev are sound lists for
every small K, M, idle exactly what check.v_schedule_idle says at F = I = W, hold the activations
the literature gives them, and are refused by name where they cannot run."""
import subprocess
import sys

import pytest

from minipipe.schedule.actions import (
    Kind,
    ScheduleError,
    chunk_placement,
    chunks_on,
    message_peer,
    train_actions,
)
from minipipe.schedule.check import check, ideal_bubble, theory_bubble, v_schedule_idle
from tests.spawn import REPO_ROOT


def test_v_placement_puts_chunks_r_and_2k_minus_1_minus_r_on_rank_r():
    assert chunk_placement("zbv", 4, 2) == (0, 1, 2, 3, 3, 2, 1, 0)
    assert chunk_placement("interleaved", 4, 2) == (0, 1, 2, 3, 0, 1, 2, 3)  # the loop: c mod K
    assert chunk_placement("dualpipev", 1, 2) == (0, 0)  # one rank holds both chunks
    for k in range(1, 9):
        placement = chunk_placement("dualpipev", k, 2)
        assert [chunks_on(placement, r) for r in range(k)] == [[r, 2 * k - 1 - r] for r in range(k)]


def test_v_messages_skip_the_turn_and_flow_down_then_up():
    """Local chunk 0 receives from rank r-1 and sends to r+1, local chunk 1 the other way; on
    rank K-1 chunk K-1 feeds chunk K in memory; K = 1 lists no message at all."""
    k, m = 3, 6
    placement = chunk_placement("zbv", k, 2)
    for r in range(k):
        for a in train_actions("zbv", r, k, m, 2):
            if a.kind in (Kind.RECV_ACT, Kind.SEND_GRAD):
                assert message_peer(placement, r, a) == (r - 1 if a.chunk == 0 else r + 1), (r, a)
            elif a.kind in (Kind.SEND_ACT, Kind.RECV_GRAD):
                assert message_peer(placement, r, a) == (r + 1 if a.chunk == 0 else r - 1), (r, a)
    turn = train_actions("zbv", k - 1, k, m, 2)
    assert not any(a.kind is Kind.SEND_ACT and a.chunk == 0 for a in turn)
    assert not any(a.kind is Kind.RECV_ACT and a.chunk == 1 for a in turn)
    assert not any(a.kind is Kind.RECV_GRAD for a in train_actions("zbv", 0, k, m, 2) if a.chunk == 1)  # the loss
    messages = (Kind.RECV_ACT, Kind.SEND_ACT, Kind.RECV_GRAD, Kind.SEND_GRAD)
    assert not any(a.kind in messages for a in train_actions("dualpipev", 0, 1, 2, 2))


@pytest.mark.parametrize("schedule", ["zbv", "dualpipev"])
def test_v_schedules_are_sound_and_idle_k_minus_1_units_at_equal_times(schedule):
    """For K <= 8, M <= 16: the simulation proves every list and each rank idles exactly
    v_schedule_idle units of 6M + idle (the formula theory_bubble reports); activations in
    flight peak at 2K chunk micro-batches for zbv (K stage micro-batches: 1F1B's peak, the
    paper's claim for ZB-V) and 2K+1 for dualpipev (the DualPipe README's PP+1 with PP = 2K)."""
    for k in range(1, 9):
        for m in range(2 * k if schedule == "dualpipev" else 1, 17):
            report = check(schedule, k, m, 2, (1, 1, 1))
            idle = v_schedule_idle(schedule, k, m)
            assert [share * report.span for share in report.bubble] == pytest.approx([idle] * k), (k, m)
            assert report.span == 6 * m + idle and max(report.bubble) == pytest.approx(theory_bubble(schedule, k, m, 2))
            if m >= 2 * k:
                assert report.peak_in_flight == [2 * k + (schedule == "dualpipev")] * k, (k, m)
    assert ideal_bubble("zbv", 4, 8, 2) == "at F = I = W (K-1)/(6M+K-1) = 3/51 = 0.059"
    assert ideal_bubble("zbv", 4, 2, 2) == "at F = I = W 2(2K-1-M)/(6M+2(2K-1-M)) = 10/22 = 0.455"


def test_v_schedules_idle_less_than_1f1b_and_zb_h1_on_the_same_model():
    """Same model and work per rank: a zbv unit is half a stage's chunk, so 1F1B's (K-1)(F+B+W)
    per rank is 6(K-1) zbv units and zb-h1's (K-1)(F+B-W) is 2(K-1); zbv and dualpipev idle K-1."""
    for k in range(2, 9):
        m = 2 * k
        for schedule, stage_units in (("1f1b", 3), ("zb-h1", 1)):
            report = check(schedule, k, m, times=(1, 1, 1))
            assert report.bubble[0] * report.span == pytest.approx((k - 1) * stage_units)
            assert 2 * (k - 1) * stage_units > v_schedule_idle("zbv", k, m) == v_schedule_idle("dualpipev", k, m)


def test_v_schedule_constraints_are_refused_by_name():
    with pytest.raises(ScheduleError, match="--virtual-stages must be 2, or left out \\(got 1\\)"):
        train_actions("zbv", 0, 2, 4)
    with pytest.raises(ScheduleError, match="--virtual-stages must be 2, or left out \\(got 3\\)"):
        train_actions("dualpipev", 0, 2, 4, 3)
    with pytest.raises(ScheduleError, match="dualpipev needs --microbatches >= 2 x 3 stages = 6 \\(got 5\\)"):
        train_actions("dualpipev", 0, 3, 5, 2)


def test_cli_grid_shows_the_v_with_input_and_weight_gradients():
    out = subprocess.run([sys.executable, "-m", "minipipe.schedule", "--schedule", "zbv", "--stages", "4",
                          "--microbatches", "8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[0].strip(): line.split("|")[1].split() for line in out.stdout.splitlines()
            if line.startswith("stage")}
    assert rows["stage 3"][:5] == [".", ".", ".", "F0c0", "F0c1"]  # chunk 3 hands chunk 4 its input at once
    assert "I0c1" in rows["stage 0"] and "W0c1" in rows["stage 0"]
    assert "I = input gradient" in out.stdout and "3/51 = 0.059" in out.stdout
