"""zb-h1 is a sound list for every small K, M, has the zero-bubble paper's bubble at F:I:W, and
holds 1F1B's peak; the checker refuses unsound split backwards by name."""
import subprocess
import sys

import pytest

from minipipe.schedule.actions import Action, Kind, ScheduleError, train_actions
from minipipe.schedule.check import check, simulate
from tests.spawn import REPO_ROOT


def computes(actions):
    return " ".join(str(a) for a in actions if a.kind in (Kind.FORWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT))


def test_zb_h1_is_1f1b_with_each_weight_gradient_delayed_by_the_rank():
    assert computes(train_actions("zb-h1", 0, 2, 4)) == "F0 F1 I0 W0 F2 I1 W1 F3 I2 W2 I3 W3"
    assert computes(train_actions("zb-h1", 1, 2, 4)) == "F0 I0 F1 I1 W0 F2 I2 W1 F3 I3 W2 W3"
    rank1 = train_actions("zb-h1", 1, 2, 1)
    assert [str(a) for a in rank1] == ["recv_act0", "F0", "I0", "send_grad0", "W0", "allreduce", "step"]


@pytest.mark.parametrize("times", [(1, 1, 1), (2, 2, 1), (1, 2, 1), (3, 2, 2), (2, 1, 1)])
def test_zb_h1_idles_k_minus_1_times_f_plus_b_minus_w_per_rank(times):
    """The paper's ZB-H1 bubble (K-1)(F+B-W) (1F1B: (K-1)(F+B+W)) for M >= K and W <= F, B;
    fewer micro-batches never idle more than 1F1B."""
    f, b, w = times
    for k in range(1, 9):
        for m in range(1, 17):
            ours, theirs = check("zb-h1", k, m, times=times), check("1f1b", k, m, times=times)
            idle = [share * ours.span for share in ours.bubble]
            assert max(idle) <= min(share * theirs.span for share in theirs.bubble) + 1e-9, (k, m)
            assert theirs.bubble[0] * theirs.span == pytest.approx((k - 1) * (f + b + w))
            if m >= k:
                assert idle == pytest.approx([(k - 1) * (f + b - w)] * k), (k, m)


def test_zb_h1_holds_1f1b_peak_and_stashes_what_1f1b_stashes_on_stage_0():
    for k in range(1, 9):
        for m in range(1, 17):
            ours, theirs = check("zb-h1", k, m), check("1f1b", k, m)
            assert ours.peak_in_flight == [min(k, m)] * k == [max(theirs.peak_in_flight)] * k
            assert ours.peak_stashed[0] == theirs.peak_stashed[0] == min(k, m)
            assert ours.peak_stashed == [min(k - r, m) for r in range(k)] == theirs.peak_stashed


def test_unsound_split_backwards_are_refused_by_name():
    with pytest.raises(ScheduleError, match="--virtual-stages must be 1"):
        train_actions("zb-h1", 0, 2, 4, 2)
    good = {r: train_actions("zb-h1", r, 2, 2) for r in range(2)}

    def with_rank1(actions):
        return simulate({0: good[0], 1: actions}, 2, 2)
    w0, i0 = Action(Kind.BACKWARD_WEIGHT, 0), Action(Kind.BACKWARD_INPUT, 0)
    early = list(good[1])
    early.remove(w0)
    early.insert(early.index(i0), w0)
    with pytest.raises(ScheduleError, match=r"rank 1, action \d+ \(W0\): weight gradient before its input"):
        with_rank1(early)
    with pytest.raises(ScheduleError, match="rank 1: backward_weight of micro-batch 0 on chunk 0 never runs"):
        with_rank1([a for a in good[1] if a != w0])
    twice = list(good[1])
    twice.insert(twice.index(w0), Action(Kind.BACKWARD, 0))
    with pytest.raises(ScheduleError, match=r"\(B0\): a second backward of the same unit"):
        with_rank1(twice)


def test_cli_grid_shows_input_and_weight_gradients():
    out = subprocess.run([sys.executable, "-m", "minipipe.schedule", "--schedule", "zb-h1", "--stages", "4",
                          "--microbatches", "8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "stage 3 |  .  .  . F0 I0 F1 I1 F2 I2 F3 I3 W0 F4" in out.stdout
    assert "I = input gradient" in out.stdout and "(simulated) = 0.111" in out.stdout
