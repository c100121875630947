"""Schedules are pure lists; the checker proves them sound for every small K, M, V."""
import subprocess
import sys

import pytest

from minipipe.schedule.actions import (
    Action,
    Kind,
    ScheduleError,
    bubble_fraction,
    forward_part,
    train_actions,
)
from minipipe.schedule.check import check, render_grid, simulate
from tests.spawn import REPO_ROOT


def names(actions):
    return " ".join(str(a) for a in actions)


def test_gpipe_lists_follow_fill_drain():
    assert names(train_actions("gpipe", 0, 1, 1)) == "F0 B0 allreduce step"
    assert names(train_actions("gpipe", 0, 1, 3)) == "F0 F1 F2 B2 B1 B0 allreduce step"
    assert names(train_actions("gpipe", 0, 2, 2)) == (
        "F0 send_act0 F1 send_act1 recv_grad1 B1 recv_grad0 B0 allreduce step")
    assert names(train_actions("gpipe", 1, 2, 2)) == (
        "recv_act0 F0 recv_act1 F1 B1 send_grad1 B0 send_grad0 allreduce step")


def test_1f1b_warms_up_k_minus_1_minus_r_forwards_then_alternates():
    assert names(a for a in train_actions("1f1b", 0, 3, 4) if a.kind in (Kind.FORWARD, Kind.BACKWARD)) == (
        "F0 F1 F2 B0 F3 B1 B2 B3")
    assert names(a for a in train_actions("1f1b", 2, 3, 4) if a.kind in (Kind.FORWARD, Kind.BACKWARD)) == (
        "F0 B0 F1 B1 F2 B2 F3 B3")


def test_interleaved_places_chunk_c_on_rank_c_mod_k():
    """K=2, V=2: rank 0 holds global chunks 0 and 2; its first forwards are the group of K=2
    micro-batches on chunk 0, then the same group on chunk 1 (global chunk 2), as Megatron."""
    rank0 = train_actions("interleaved", 0, 2, 4, 2)
    computes = [str(a) for a in rank0 if a.kind in (Kind.FORWARD, Kind.BACKWARD)]
    assert computes[:4] == ["F0c0", "F1c0", "F0c1", "F1c1"]
    assert Action(Kind.RECV_ACT, 0, 1, 2) in rank0  # chunk 2's input comes from rank 1 (chunk 1)
    assert Action(Kind.SEND_ACT, 0, 1, 2) in rank0  # chunk 2 -> chunk 3 on rank 1
    assert Action(Kind.SEND_ACT, 0, 1, 2) not in train_actions("interleaved", 1, 2, 4, 2)  # chunk 3 is last
    k1 = train_actions("interleaved", 0, 1, 2, 2)  # one rank: chunk hand-offs are local, no messages
    assert {a.kind for a in k1} == {Kind.FORWARD, Kind.BACKWARD, Kind.ALLREDUCE, Kind.STEP}


@pytest.mark.parametrize("schedule, k, m, v, message", [
    ("interleaved", 2, 3, 2, "must be a multiple of 2"),
    ("interleaved", 2, 4, 1, "needs --virtual-stages >= 2"),
    ("1f1b", 2, 4, 2, "--virtual-stages must be 1"),
    ("gpipe", 0, 4, 1, "K=0"),
    ("pipedream", 2, 4, 1, "choose one of gpipe, 1f1b, interleaved, zb-h1"),
])
def test_impossible_schedules_are_refused_with_the_constraint(schedule, k, m, v, message):
    with pytest.raises(ScheduleError, match=message):
        train_actions(schedule, 0, k, m, v)


def _cases():
    for schedule in ("gpipe", "1f1b", "interleaved"):  # the zero-bubble ones: tests/test_zero_bubble.py
        for k in range(1, 9):
            for m in range(1, 17):
                for v in ((1,) if schedule != "interleaved" else (2, 3, 4)):
                    if schedule != "interleaved" or m % k == 0:
                        yield schedule, k, m, v


def test_every_schedule_is_deadlock_free_complete_and_has_the_formula_bubble():
    """K <= 8, M <= 16, V <= 4: the simulated idle share of every rank equals the literature's
    formula; 1f1b keeps K - r micro-batches in flight on rank r (gpipe M); forwards pair up alone."""
    n = 0
    for schedule, k, m, v in _cases():
        report = check(schedule, k, m, v)
        what = f"{schedule} K={k} M={m} V={v}"
        assert report.bubble == pytest.approx([bubble_fraction(k, m, v)] * k, abs=1e-12), what
        assert report.span == 2 * (v * m + k - 1), what
        if schedule == "gpipe":
            assert report.peak_in_flight == [m] * k, what
        elif schedule == "1f1b":
            assert report.peak_in_flight == [min(k - r, m) for r in range(k)], what
        n += 1
    assert n == 2 * 8 * 16 + 3 * sum(16 // k for k in range(1, 9))


def test_forward_only_lists_pair_up():
    for schedule, k, m, v in [("gpipe", 3, 4, 1), ("1f1b", 4, 5, 1), ("interleaved", 2, 4, 3)]:
        lists = {r: forward_part(train_actions(schedule, r, k, m, v)) for r in range(k)}
        channels = {}
        for r in range(k):
            for a in lists[r]:
                if a.kind is Kind.SEND_ACT:
                    channels.setdefault((r, (r + 1) % k), []).append((a.microbatch, a.chunk + (r == k - 1)))
        for r in range(k):
            received = [(a.microbatch, a.chunk) for a in lists[r] if a.kind is Kind.RECV_ACT]
            assert received == channels.get(((r - 1) % k, r), []), (schedule, r)


def test_bad_hand_made_lists_are_refused_naming_rank_and_action():
    lists = {r: train_actions("1f1b", r, 2, 2) for r in range(2)}
    swapped = list(lists[1])
    i, j = swapped.index(Action(Kind.RECV_ACT, 0)), swapped.index(Action(Kind.RECV_ACT, 1))
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(ScheduleError, match=r"rank 1, action 0 \(recv_act1\): rank 0 sent the activation "
                                            r"of chunk 1 micro-batch 0 first"):
        simulate({0: lists[0], 1: swapped}, 2, 2)
    # rank 0 waits for a gradient before sending the activation it depends on
    early = [Action(Kind.FORWARD, 0), Action(Kind.RECV_GRAD, 0), Action(Kind.SEND_ACT, 0), Action(Kind.BACKWARD, 0),
             Action(Kind.ALLREDUCE), Action(Kind.STEP)]
    one = {0: early, 1: train_actions("gpipe", 1, 2, 1)}
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 waits at action 1 \(recv_grad0\); "
                                            r"rank 1 waits at action 0 \(recv_act0\)"):
        simulate(one, 2, 1)
    missing = {0: [a for a in train_actions("gpipe", 0, 1, 2) if str(a) != "B1"]}
    with pytest.raises(ScheduleError, match="rank 0: backward of micro-batch 1 on chunk 0 never runs"):
        simulate(missing, 1, 2)


def test_gpipe_grid_places_f_and_b_on_the_paper_clocks():
    grid = render_grid("gpipe", 4, 8).splitlines()
    rows = {line.split("|")[0].strip(): line.split("|")[1].split() for line in grid if line.startswith("stage")}
    assert len(rows) == 4 and all(len(r) == 2 * (8 + 3) for r in rows.values())
    assert rows["stage 0"][:8] == [f"F{m}" for m in range(8)]
    assert rows["stage 3"][3] == "F0" and rows["stage 3"][11] == "B7"  # last stage turns around at once
    assert rows["stage 0"][-1] == "B0" and rows["stage 3"][-1] == "."
    assert "3/11 = 0.273" in grid[-1]


def test_cli_prints_each_grid_and_refuses_bad_input():
    ok = subprocess.run([sys.executable, "-m", "minipipe.schedule", "--schedule", "1f1b", "--stages", "4",
                         "--microbatches", "8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "stage 3 |  .  .  . F0 B0 F1 B1" in ok.stdout and "3/11 = 0.273" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "minipipe.schedule", "--schedule", "interleaved",
                          "--stages", "4", "--microbatches", "6", "--virtual-stages", "2"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be a multiple of 4" in bad.stderr
