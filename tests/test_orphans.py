"""No orphans: `kill -9` of torchrun makes its workers stop within --timeout (the kernel's
parent-death signal is a SIGTERM: they stop at the next step boundary, saving a complete
checkpoint), instead of training on with parent 1. The test leaves no process behind."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import TINY_FLAGS
from tests.spawn import REPO_ROOT, descendants

TIMEOUT_S = 30  # the run's --timeout: the bound on how long a worker may outlive its launcher
LOADED_MACHINE_SLACK_S = 30


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_workers_stop_within_the_timeout_when_torchrun_is_killed(tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", *TINY_FLAGS, "--steps", "1000000", "--log-every", "1", "--ckpt-dir", str(ckpt),
           "--metrics-jsonl", str(metrics), "--timeout", str(TIMEOUT_S), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    with open(tmp_path / "log", "w") as log:
        launcher = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    workers = []
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # steps are running
            assert launcher.poll() is None, (tmp_path / "log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        workers = descendants(launcher.pid)
        assert len(workers) >= 2, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        killed = time.monotonic()
        while any(map(_running, workers)) and time.monotonic() - killed < TIMEOUT_S + LOADED_MACHINE_SLACK_S:
            time.sleep(0.2)
        left = [pid for pid in workers if _running(pid)]
        assert left == [], f"workers {left} outlived torchrun by {time.monotonic() - killed:.0f} s"
    finally:
        _kill([launcher.pid, *workers, *descendants(launcher.pid)])
        launcher.wait()
    # They stopped at a step boundary: the checkpoint is complete, nothing half-written is left.
    step = ckpt / (ckpt / "latest").read_text().strip()
    recorded = json.loads((step / "trainer_state.json").read_text())["files"]
    assert all((step / name).stat().st_size == record["bytes"] for name, record in recorded.items())
    assert not list(ckpt.glob(".tmp-*")) and not (ckpt / "minipipe.lock").exists()
