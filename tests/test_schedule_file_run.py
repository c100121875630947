"""`train.py --schedule PATH.csv` runs a schedule file: the file written for zbv by `python -m
minipipe.schedule --csv` trains exactly as `--schedule zbv` (its placement, the V, read from
the file's rows); a file that deadlocks is refused by every rank, by name, before any rank
waits; a checkpoint written under a file resumes under the named schedule."""
import json
import subprocess
import sys

from minipipe.config import make_config
from minipipe.errors import ConfigError
from tests.spawn import REPO_ROOT, run_torchrun

TINY = ["--model", "transformer", "--layers", "4", "--d-model", "16", "--heads", "2", "--max-seq-len", "8",
        "--data", "synthetic", "--batch-size", "8", "--microbatches", "4", "--dtype", "float64",
        "--dropout", "0.1", "--eval-every", "0", "--log-every", "1", "--timeout", "60"]


def _write_schedule(path, *args):
    done = subprocess.run([sys.executable, "-m", "minipipe.schedule", "--stages", "2", "--microbatches", "4",
                           *args, "--csv", str(path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _losses(jsonl) -> list[float]:
    return [record["loss"] for record in map(json.loads, jsonl.read_text().splitlines()) if "loss" in record]


def _train(tmp_path, name, *flags):
    jsonl = tmp_path / f"{name}.jsonl"
    done = run_torchrun(["train.py", *TINY, "--metrics-jsonl", str(jsonl), *flags], nproc=2, timeout_s=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(jsonl)


def test_a_schedule_file_trains_as_the_schedule_it_was_written_from_and_checkpoints(tmp_path):
    csv = tmp_path / "zbv.csv"
    _write_schedule(csv, "--schedule", "zbv", "--virtual-stages", "2")
    assert csv.read_text().splitlines()[0].startswith("0F0,0F1,0F2,3F0,3I0,3W0")  # model chunks 0 and 3
    ckpt = tmp_path / "ckpt"
    from_file = _train(tmp_path, "file", "--schedule", str(csv), "--steps", "4", "--ckpt-dir", str(ckpt),
                       "--ckpt-every", "2")
    named = _train(tmp_path, "named", "--schedule", "zbv", "--virtual-stages", "2", "--steps", "4")
    assert len(from_file) == 4 and from_file == named  # bitwise: the same lists run
    state = json.loads((ckpt / "step-000002" / "trainer_state.json").read_text())
    assert state["config"]["schedule"] == str(csv) and state["config"]["virtual_stages"] == 2
    resumed = _train(tmp_path, "resumed", "--schedule", "zbv", "--virtual-stages", "2", "--steps", "4",
                     "--ckpt-dir", str(tmp_path / "resumed-ckpt"), "--resume", str(ckpt / "step-000002"))
    assert resumed == from_file[2:]


def test_a_deadlocking_file_is_refused_by_every_rank_before_any_waits(tmp_path):
    bad = tmp_path / "deadlock.csv"
    _write_schedule(bad, "--schedule", "zbv", "--virtual-stages", "2")
    cells = bad.read_text().splitlines()[0].split(",")
    cells.remove("3F0")  # rank 0 waits for chunk 2's output before it sends chunk 1 its input
    bad.write_text("\n".join([",".join(["3F0", *cells]), bad.read_text().splitlines()[1]]) + "\n")
    done = run_torchrun(["train.py", *TINY, "--schedule", str(bad), "--steps", "1"], nproc=2, timeout_s=120)
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines() if line.startswith("minipipe error:")]
    assert len(refusals) == 2 and all("deadlock: rank 0 waits at action 0 (recv_act0c1); "
                                      "rank 1 waits at action 0 (recv_act0c0)" in line for line in refusals), done.stderr[-3000:]


def test_the_file_decides_v_and_a_disagreeing_flag_is_refused(tmp_path):
    csv = tmp_path / "interleaved.csv"
    csv.write_text("0F0,2F0,2B0,0B0\n1F0,3F0,3B0,1B0\n")
    assert make_config(schedule=str(csv)).virtual_stages == 2
    try:
        make_config(schedule=str(csv), virtual_stages=3)
    except ConfigError as err:
        assert "runs 2 model chunk(s) per stage; --virtual-stages 3 disagrees" in str(err)
    else:
        raise AssertionError("--virtual-stages 3 was accepted for a file with 2 chunks per row")
