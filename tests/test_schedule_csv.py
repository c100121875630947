"""Schedules as files in torch.distributed.pipelining's compute-only CSV form: minipipe writes
what torch's own reader loads and validates, reads back what torch writes, and proves a
hand-written file (or names why it cannot run) before anything runs."""
import subprocess
import sys

import pytest
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    _PipelineScheduleRuntime,
)

from minipipe.schedule.actions import ScheduleError, chunk_placement, train_actions
from minipipe.schedule.check import check, schedule_lists
from minipipe.schedule.csv_format import csv_rows, read_csv, write_csv
from tests.spawn import REPO_ROOT


def _torch_reader(k: int, m: int, n_chunks: int):
    """torch's schedule runtime with only what its CSV reader and validator use (no stages)."""
    runtime = object.__new__(_PipelineScheduleRuntime)
    runtime.pipeline_order, runtime._stages, runtime._defer_pp_recv = {}, [], False
    runtime.pp_group_size, runtime._num_stages, runtime._n_microbatches = k, n_chunks, m
    return runtime


@pytest.mark.parametrize("schedule, k, m, v", [("zb-h1", 2, 4, 1), ("zb-h1", 4, 8, 1), ("1f1b", 3, 5, 1),
                                               ("gpipe", 2, 3, 1), ("zbv", 2, 4, 2), ("zbv", 4, 8, 2),
                                               ("dualpipev", 3, 6, 2), ("interleaved", 2, 4, 2)])
def test_round_trip_through_torchs_own_csv_reader_and_writer(tmp_path, schedule, k, m, v):
    """A cell's stage index is the model chunk; torch derives each stage's rank from the rows
    (its stage_index_to_group_rank), which must be minipipe's placement: the V for zbv."""
    ours = tmp_path / "ours.csv"
    lists, placement = schedule_lists(schedule, k, m, v)
    write_csv(ours, csv_rows(lists, placement))
    runtime = _torch_reader(k, m, k * v)
    runtime._load_csv(str(ours))  # torch validates it and lowers it with its messages
    assert {r: [str(a) for a in actions] for r, actions in runtime.pipeline_order.items()} == dict(
        enumerate(csv_rows(lists, placement)))
    assert tuple(runtime.stage_index_to_group_rank[c] for c in range(k * v)) == placement
    theirs = tmp_path / "theirs.csv"
    PipelineScheduleMulti._dump_csv(runtime, str(theirs))  # torch's compute-only writer
    back, placement_back = read_csv(theirs, k, m)
    assert placement_back == placement == chunk_placement(schedule, k, v)
    assert back == {r: train_actions(schedule, r, k, m, v) for r in range(k)}


def test_a_hand_written_file_is_proven_or_refused_by_name(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("0F0,0F1,0I0,0W0,0I1,0W1\n1F0,1I0,1F1,1I1,1W1,1W0\n")
    report = check(str(good), 2, 2)
    assert report.peak_in_flight == [2, 2] and report.span == 7
    deadlock = tmp_path / "deadlock.csv"
    deadlock.write_text("0F0,0I0,0W0,0F1,0I1,0W1\n1F1,1I1,1W1,1F0,1I0,1W0\n")
    with pytest.raises(ScheduleError, match="the activation of chunk 1 micro-batch 0 first"):
        check(str(deadlock), 2, 2)
    for text, why in (("0F0,0SEND_F0\n1F0\n", "not a compute action"), ("0F0,1F0\n1F0\n", "names chunk 1, which is already on row 0"),
                      ("0F0\n2F0\n", "no row runs chunk 1"), ("0F0,1F0\n2F0\n", "row 0 runs chunks \\[0, 1\\] of 3"),
                      ("0F0,0B0\n", "1 rows, one per rank")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(ScheduleError, match=why):
            read_csv(bad, 2, 1)


def test_cli_writes_a_named_schedule_and_checks_a_file(tmp_path):
    out = tmp_path / "new-folder" / "zb.csv"  # made as --trace makes its folder
    run = [sys.executable, "-m", "minipipe.schedule", "--stages", "2", "--microbatches", "4"]
    wrote = subprocess.run([*run, "--schedule", "zb-h1", "--csv", str(out)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=60)
    assert wrote.returncode == 0, wrote.stderr
    assert out.read_text().splitlines()[1] == "1F0,1I0,1F1,1I1,1W0,1F2,1I2,1W1,1F3,1I3,1W2,1W3"
    shown = subprocess.run([*run, "--schedule", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and shown.stdout.splitlines()[:4] == wrote.stdout.splitlines()[:4]
    out.write_text("0F0,0I0,0W0\n1I0,1F0,1W0\n")
    refused = subprocess.run([*run, "--microbatches", "1", "--schedule", str(out)], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "backward before its forward" in refused.stderr
