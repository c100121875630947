import subprocess
import sys

import pytest

from minipipe.schedule import (ACTION_KINDS, Action, bubble_fraction, forward_actions, gpipe_actions,
                               render_grid)
from tests.spawn import REPO_ROOT


def names(actions):
    return " ".join(str(a) for a in actions)


def test_action_lists_follow_fill_drain():
    assert names(gpipe_actions(0, 1, 1)) == "F0 B0 allreduce step"
    assert names(gpipe_actions(0, 1, 3)) == "F0 F1 F2 B2 B1 B0 allreduce step"
    assert names(gpipe_actions(0, 2, 2)) == (
        "F0 send_act0 F1 send_act1 recv_grad1 B1 recv_grad0 B0 allreduce step")
    assert names(gpipe_actions(1, 2, 2)) == (
        "recv_act0 F0 recv_act1 F1 B1 send_grad1 B0 send_grad0 allreduce step")
    assert names(gpipe_actions(1, 3, 1)) == "recv_act0 F0 send_act0 recv_grad0 B0 send_grad0 allreduce step"


@pytest.mark.parametrize("n_stages, n_microbatches", [(1, 1), (1, 4), (3, 1), (4, 8)])
def test_forward_actions_are_the_fill_half(n_stages, n_microbatches):
    for stage in range(n_stages):
        full = gpipe_actions(stage, n_stages, n_microbatches)
        fwd = forward_actions(stage, n_stages, n_microbatches)
        assert full[:len(fwd)] == fwd
        assert {a.kind for a in fwd} <= {"recv_act", "forward", "send_act"}
        assert [a.microbatch for a in fwd if a.kind == "forward"] == list(range(n_microbatches))


def test_action_rejects_unknown_kind_and_bad_microbatch():
    assert ACTION_KINDS[0] == "recv_act" and str(Action("send_grad", 1)) == "send_grad1"
    with pytest.raises(ValueError):
        Action("fwd", 0)
    with pytest.raises(ValueError):
        Action("step", 0)
    with pytest.raises(ValueError):
        gpipe_actions(2, 2, 4)


def simulate(n_stages, n_microbatches):
    """Run every stage's action list: sends never block, a recv blocks until its message is queued.
    Returns the per-channel message order; raises AssertionError on deadlock or mismatch."""
    programs = [gpipe_actions(s, n_stages, n_microbatches) for s in range(n_stages)]
    pcs = [0] * n_stages
    channels = {}  # (src, dst, kind) -> queued micro-batch indices, FIFO like a p2p channel
    delivered = []
    while any(pc < len(p) for pc, p in zip(pcs, programs)):
        progressed = False
        for s, program in enumerate(programs):
            while pcs[s] < len(program):
                action = program[pcs[s]]
                if action.kind == "send_act":
                    channels.setdefault((s, s + 1, "act"), []).append(action.microbatch)
                elif action.kind == "send_grad":
                    channels.setdefault((s, s - 1, "grad"), []).append(action.microbatch)
                elif action.kind in ("recv_act", "recv_grad"):
                    src = s - 1 if action.kind == "recv_act" else s + 1
                    queue = channels.get((src, s, action.kind[5:]), [])
                    if not queue:
                        break  # blocked
                    got = queue.pop(0)
                    assert got == action.microbatch, f"stage {s} expected {action}, got micro-batch {got}"
                    delivered.append((src, s, action.kind, got))
                pcs[s] += 1
                progressed = True
        assert progressed, f"deadlock at K={n_stages} M={n_microbatches}: pcs={pcs}"
    assert all(not q for q in channels.values()), "a message was sent but never received"
    return delivered


@pytest.mark.parametrize("n_stages", range(1, 6))
def test_every_send_meets_its_recv_without_deadlock(n_stages):
    for n_microbatches in range(1, 9):
        delivered = simulate(n_stages, n_microbatches)
        assert len(delivered) == 2 * (n_stages - 1) * n_microbatches


def test_grid_places_f_and_b_on_gpipe_clocks():
    grid = render_grid(4, 8).splitlines()
    rows = {line.split("|")[0].strip(): line.split("|")[1].split() for line in grid if line.startswith("stage")}
    assert len(rows) == 4 and all(len(r) == 2 * (8 + 3) for r in rows.values())
    assert rows["stage 0"][:8] == [f"F{m}" for m in range(8)]
    assert rows["stage 3"][3] == "F0" and rows["stage 3"][11] == "B7"  # last stage turns around at once
    assert rows["stage 0"][-1] == "B0" and rows["stage 3"][-1] == "."
    for row in rows.values():  # each stage is busy 2M ticks, idle 2(K-1)
        assert sum(c == "." for c in row) == 2 * 3
    assert grid[-1].endswith("3/11 = 0.273")


def test_bubble_fraction_is_k_minus_1_over_m_plus_k_minus_1():
    assert bubble_fraction(1, 5) == 0.0
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(2, 1) == pytest.approx(0.5)
    assert render_grid(1, 1).splitlines()[-1].endswith("= 0.000")


def test_cli_prints_grid_and_rejects_zero_stages():
    ok = subprocess.run([sys.executable, "-m", "minipipe.schedule", "--stages", "2", "--microbatches", "3"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "stage 1" in ok.stdout and "1/4 = 0.250" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "minipipe.schedule", "--stages", "0"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--stages and --microbatches must be >= 1" in bad.stderr
