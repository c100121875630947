"""Process groups: world = dp x stages; rank -> (dp_rank, stage); backend nccl (GPU) or gloo (CPU).

Rank layout: rank = dp_rank * n_stages + stage, so the stages of one pipeline replica are adjacent
in rank order (on a multi-GPU node, neighbours share the fastest links). Groups:
- stage_group: the dp ranks holding the same stage (its gradients are all-reduced there);
- pipeline_group: the n_stages ranks of one replica (broadcasts along the pipeline);
- p2p (only when n_stages > 1): the groups that minipipe.pipeline.comm sends on, all over the ranks of one
  replica: one gloo group for the shape headers (host tensors, so reading a header never waits
  for a GPU) and one group per payload lane on the default backend (see minipipe.pipeline.comm.lane_of
  for why NCCL needs four).
Every rank creates every group in the same order, as torch.distributed.new_group requires.
The timeout bounds every collective and, on NCCL, every payload (the watchdog); waits on gloo
are bounded in minipipe.pipeline.comm as well.

On CUDA the process's current device is set to cuda:LOCAL_RANK, also when the caller initialised
the default group: NCCL, the caching allocator and torch.cuda.manual_seed act on the current
device, so a stage whose current device is another GPU would run its communicators and seed its
dropout there.
"""
import ctypes
import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from minipipe.errors import ConfigError
from minipipe.pipeline.comm import N_LANES


@dataclass(frozen=True)
class P2PGroups:
    """What one replica's point-to-point messages travel on (minipipe.pipeline.comm picks per message)."""
    headers: dist.ProcessGroup  # gloo on every backend: headers are host tensors
    lanes: tuple  # N_LANES groups on the default backend; minipipe.pipeline.comm.lane_of picks one
    backend: str  # of the lanes: "nccl" (payload waits are stream waits) or "gloo"


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    stage: int
    dp_rank: int
    n_stages: int
    dp: int
    prev_rank: int | None  # rank of stage - 1 in this replica; None on the first stage
    next_rank: int | None  # rank of stage + 1 in this replica; None on the last stage
    stage_group: dist.ProcessGroup
    pipeline_group: dist.ProcessGroup
    device: torch.device
    p2p: P2PGroups | None  # None with one stage (nothing is sent)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_launcher() -> None:
    """A worker started by a launcher (torchrun sets LOCAL_RANK) gets SIGTERM from the kernel when
    its launcher dies, even by kill -9: it then stops as on any SIGTERM (at the next step
    boundary, saving a complete checkpoint with --ckpt-dir; else at once), instead of training on
    with parent 1. A launcher already gone when this runs is caught by comparing the parent."""
    if sys.platform != "linux" or "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # (a kernel without it: the launcher's death then shows as a timeout)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def init_process_groups(n_stages: int, dp: int, timeout_s: float, device: str = "auto") -> Layout:
    """Join (or create) the default process group from RANK/WORLD_SIZE/LOCAL_RANK and build the
    stage and pipeline groups. A single process with no launcher gets a one-rank gloo group.
    device: auto (cuda:LOCAL_RANK when available), cpu (gloo even on a GPU machine), cuda."""
    if n_stages < 1 or dp < 1:
        raise ConfigError(f"--stages and --dp must be >= 1, got stages={n_stages}, dp={dp}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:  # before any NCCL communicator exists, also when the caller made the group
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        check_world(world_size, n_stages, dp)  # refuse before any process waits on a rendezvous
        backend = "nccl" if use_cuda else "gloo"
        timeout = timedelta(seconds=timeout_s)
        launched = world_size > 1 or {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys()
        if launched:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    check_world(world_size, n_stages, dp)
    timeout = timedelta(seconds=timeout_s)
    stage_groups = [dist.new_group([d * n_stages + s for d in range(dp)], timeout=timeout)
                    for s in range(n_stages)]
    pipeline_groups = [dist.new_group([d * n_stages + s for s in range(n_stages)], timeout=timeout)
                       for d in range(dp)]
    dp_rank, stage = divmod(rank, n_stages)
    p2p = _p2p_groups(n_stages, dp, timeout, device)[dp_rank] if n_stages > 1 else None
    return Layout(rank=rank, world_size=world_size, stage=stage, dp_rank=dp_rank,
                  n_stages=n_stages, dp=dp,
                  prev_rank=rank - 1 if stage > 0 else None,
                  next_rank=rank + 1 if stage < n_stages - 1 else None,
                  stage_group=stage_groups[stage], pipeline_group=pipeline_groups[dp_rank],
                  device=device, p2p=p2p)


def _p2p_groups(n_stages: int, dp: int, timeout: timedelta, device: torch.device) -> list[P2PGroups]:
    """Every replica's point-to-point groups (created on every rank, in one order)."""
    backend = dist.get_backend()  # "nccl", "gloo", or per device type: "cpu:gloo,cuda:nccl"
    if ":" in backend:
        backend = dict(entry.split(":") for entry in backend.split(","))[device.type]
    replicas = [[d * n_stages + s for s in range(n_stages)] for d in range(dp)]
    headers = [dist.new_group(ranks, timeout=timeout, backend="gloo") for ranks in replicas]
    lanes = [[dist.new_group(ranks, timeout=timeout) for _ in range(N_LANES)] for ranks in replicas]
    return [P2PGroups(headers[d], tuple(lanes[d]), backend) for d in range(dp)]


def check_world(world_size: int, n_stages: int, dp: int) -> None:
    if world_size != dp * n_stages:
        raise ConfigError(f"world size {world_size} != dp {dp} x stages {n_stages} = {dp * n_stages}; "
                          f"launch {dp * n_stages} processes (torchrun --nproc_per_node) or change "
                          "--stages / --dp so that their product is the number of processes")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
