"""A run survives being stopped: a worker killed under `torchrun --max-restarts` resumes from the
latest complete checkpoint and finishes with the uninterrupted losses; a SIGTERM to one worker
(or a Ctrl-C's SIGINT) makes every rank save at the same step boundary and exit cleanly."""
import json
import os
import signal
import threading
import time

import pytest

import train
from minipipe.config import make_config
from minipipe.tracking.metrics import MetricsLogger
from tests.spawn import descendants, run_torchrun

SHAPE = ["--layers", "4", "--d-model", "16", "--heads", "2", "--max-seq-len", "8", "--data",
         "synthetic", "--batch-size", "8", "--microbatches", "2", "--eval-every", "0"]
# gloo restarts fail against the previous attempt's store without this (torch issue #135712)
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "WANDB_MODE": "disabled"}


def _worker_pid(rank: int) -> int | None:
    """The pid of this test's train.py worker with RANK=rank (torchrun's child), if running."""
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmd, open(f"/proc/{pid}/environ", "rb") as env:
                if b"train.py" in cmd.read() and f"RANK={rank}".encode() in env.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    return None


def _signal_worker_when(ready, rank: int, sig: int, sent: list) -> threading.Thread:
    """In the background: once ready() holds, send `sig` to worker `rank` (recorded in `sent`)."""
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pid = _worker_pid(rank) if ready() else None
            if pid is not None:
                os.kill(pid, sig)
                sent.append(pid)
                return
            time.sleep(0.01)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _logged_losses(jsonl) -> dict:
    """step -> loss; a step logged again after a restart keeps its last value."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _reference_losses(steps: int) -> list:
    cfg = make_config(model="transformer", layers=4, d_model=16, heads=2, max_seq_len=8,
                      data="synthetic", batch_size=8, microbatches=2, eval_every=0, steps=steps)
    return train.train(cfg, logger=MetricsLogger([]))["losses"]


def test_a_killed_worker_is_restarted_and_the_run_finishes_with_the_straight_losses(tmp_path):
    ckpt, jsonl = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    steps = 60
    sent = []
    watcher = _signal_worker_when(lambda: (ckpt / "latest").exists(), 1, signal.SIGKILL, sent)
    done = run_torchrun(["train.py", *SHAPE, "--steps", str(steps), "--ckpt-dir", str(ckpt),
                         "--ckpt-every", "10", "--metrics-jsonl", str(jsonl)], nproc=2,
                        extra_torchrun_args=["--max-restarts=1"], env=RESTART_ENV, timeout_s=180)
    watcher.join()
    assert sent, "the watcher never killed a worker"
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout  # the second attempt started from a checkpoint
    assert (ckpt / "latest").read_text().strip() == f"step-{steps:06d}"
    logged = _logged_losses(jsonl)
    assert sorted(logged) == list(range(1, steps + 1))  # steps count from 1
    assert [logged[step] for step in range(1, steps + 1)] == _reference_losses(steps)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # SIGINT: a Ctrl-C
def test_a_stop_signal_to_one_worker_saves_at_the_next_step_boundary_and_exits_cleanly(tmp_path, sig):
    ckpt, jsonl = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    sent = []
    started = lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3  # noqa: E731
    watcher = _signal_worker_when(started, 1, sig, sent)
    done = run_torchrun(["train.py", *SHAPE, "--steps", "5000", "--ckpt-dir", str(ckpt),
                         "--metrics-jsonl", str(jsonl)], nproc=2, env=RESTART_ENV, timeout_s=180)
    watcher.join()
    assert sent and done.returncode == 0, done.stderr[-3000:]
    logged = _logged_losses(jsonl)
    last_step = max(logged)
    assert last_step < 5000  # stopped early ...
    saved = sorted(p.name for p in ckpt.iterdir())
    assert saved == ["latest", f"step-{last_step:06d}"]  # ... after saving that very step
    state = json.loads((ckpt / saved[1] / "trainer_state.json").read_text())
    assert state["step"] == last_step - 1 and state["data_cursor"]["position"] == last_step
