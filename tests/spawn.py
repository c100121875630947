"""The one helper every multi-process test uses to start gloo workers on the CPU.

run_workers(fn, world_size, *args)  -> [fn(0, world_size, *args), fn(1, ...), ...]
    Each worker is a fresh 'spawn' process with MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE,
    LOCAL_RANK set and one CPU thread, so `minipipe.dist.init_process_groups` (env://) just works.
    `fn` must be a module-level function and its return value picklable. A failing rank raises
    AssertionError here with every failed rank's exception and traceback; with
    expect_failure=True the per-rank Outcomes come back instead. No worker outlives the call.

run_torchrun(script_args, nproc)  -> CompletedProcess of `python -m torch.distributed.run`
    The real entry point, from the repo root, output captured; on timeout torchrun and every
    worker are killed.
"""
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILURE_GRACE_S = 5.0  # after one rank fails, how long the others get to report before being killed


@dataclass(frozen=True)
class Outcome:
    """What one rank ended with: a return value, or an error ('Died'/'Timeout' if it never reported)."""
    rank: int
    value: Any = None
    error: str | None = None  # exception type name, e.g. "PipelineError"
    message: str = ""
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn, rank, world_size, args, env, results):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        outcome = pickle.dumps(Outcome(rank, value=fn(rank, world_size, *args)))
    except BaseException as exc:  # report everything, including SystemExit, to the test process
        outcome = pickle.dumps(Outcome(rank, error=type(exc).__name__, message=str(exc),
                                       traceback=traceback.format_exc()))
    # Plain pickle bytes: torch's queue reductions would pass tensors as shared-memory handles,
    # which are dead once this worker exits.
    results.put(outcome)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout_s: float = 120, env: dict | None = None,
                expect_failure: bool = False) -> list:
    """Run fn(rank, world_size, *args) in world_size processes; return the values by rank
    (or, with expect_failure=True, the Outcome of each rank without raising)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
                 **(env or {})}
    procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, args, child_env, results),
                         daemon=True) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outcomes = _collect(procs, results, timeout_s, wait_for_all=expect_failure)
    for proc in procs:  # nothing outlives the call
        if proc.is_alive():
            proc.kill()
        proc.join()
    results.close()
    if expect_failure:
        return outcomes
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise AssertionError(f"{len(failed)} of {world_size} workers failed:\n" + "\n".join(
            f"--- rank {o.rank}: {o.error}: {o.message}\n{o.traceback}" for o in failed))
    return [o.value for o in outcomes]


def _collect(procs, results, timeout_s, wait_for_all) -> list[Outcome]:
    """Gather one Outcome per rank: reported, died without reporting, or killed at the deadline."""
    outcomes: dict[int, Outcome] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < len(procs) and time.monotonic() < deadline:
        try:
            outcome = pickle.loads(results.get(timeout=0.1))
            outcomes[outcome.rank] = outcome
            if not outcome.ok and not wait_for_all:
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            continue
        except queue.Empty:
            pass
        for rank, proc in enumerate(procs):
            if rank not in outcomes and proc.exitcode is not None:
                try:  # a result may still be in the pipe just after the process exited
                    late = pickle.loads(results.get(timeout=0.5))
                    outcomes[late.rank] = late
                except queue.Empty:
                    outcomes[rank] = Outcome(rank, error="Died",
                                             message=f"exited with code {proc.exitcode} without reporting")
                    if not wait_for_all:
                        deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
                break
    for rank in range(len(procs)):
        outcomes.setdefault(rank, Outcome(rank, error="Timeout",
                                          message=f"still running after {timeout_s} s; killed"))
    return [outcomes[rank] for rank in range(len(procs))]


def run_torchrun(script_args: list[str], nproc: int, timeout_s: float = 300, env: dict | None = None,
                 extra_torchrun_args: list[str] = ()) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N [extra] script_args` from
    the repo root; torchrun and all its workers are killed (and AssertionError raised) on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *extra_torchrun_args, *script_args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
                **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts each worker in its own session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun {' '.join(script_args)} timed out after {timeout_s} s\n"
                             f"--- stdout tail:\n{stdout[-3000:]}\n--- stderr tail:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (Linux /proc), found before anything is killed."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
