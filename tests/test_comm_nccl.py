"""What a CPU machine can prove about point-to-point on GPUs and NCCL, without processes:
- payloads on a device are never read by the host (the `meta` device refuses any read), headers
  are host tensors, and NCCL payload waits are stream waits (no timeout, no polling);
- the payload lanes keep every schedule deadlock-free on NCCL, where a send may wait for its
  receive and one stream per group and pair runs operations in the order posted;
- NCCL's and gloo's failure texts become the same reasons in PipelineErrors;
- the CUDA device is made current also when the caller initialised the process group.
"""
import functools
from collections import defaultdict, deque
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from minipipe.dist import P2PGroups, init_process_groups
from minipipe.errors import describe_comm_failure
from minipipe.pipeline.comm import ACTIVATION, GRADIENT, N_LANES, StageComm, lane_of
from minipipe.schedule.actions import (
    SCHEDULES,
    Kind,
    ScheduleError,
    check_schedule,
    chunk_placement,
    message_peer,
    train_actions,
)
from tests.spawn import free_port

TIMEOUT_S = 5.0


# ---- no host read of a payload; host headers; stream waits on NCCL ----------------------------
class FakeWork:
    def __init__(self, log, tensor):
        self.log, self.tensor = log, tensor

    def wait(self, timeout=None):
        self.log.append((self.tensor.device.type, timeout))
        return True

    def is_completed(self):
        return True


class FakeWire:
    """isend/irecv between StageComms of one process, FIFO per (group, src, dst, tag). A group is
    a label tuple whose last entry is the rank that owns it."""

    def __init__(self):
        self.queues = defaultdict(deque)
        self.transfers = []  # (op, group label, device type of the tensor)
        self.waits = []  # (device type of the tensor, timeout passed to wait)

    def isend(self, tensor, dst, group, tag):
        self.queues[group[:-1], group[-1], dst, tag].append(tensor.clone())
        self.transfers.append(("send", group[:-1], tensor.device.type))
        return FakeWork(self.waits, tensor)

    def irecv(self, tensor, src, group, tag):
        tensor.copy_(self.queues[group[:-1], src, group[-1], tag].popleft())
        self.transfers.append(("recv", group[:-1], tensor.device.type))
        return FakeWork(self.waits, tensor)


def fake_groups(rank, backend):
    return P2PGroups(("headers", rank), tuple(("lane", i, rank) for i in range(N_LANES)), backend)


@pytest.mark.parametrize("backend,device", [
    ("nccl", "meta"), ("gloo", "meta"),
    pytest.param("nccl", "cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_send_and_recv_never_read_a_payload_on_the_host_and_wait_on_nccl_payloads_by_stream(
        monkeypatch, backend, device):
    """`meta`: a device whose memory the host cannot read, so any host read of a payload raises.
    On a GPU the same exchange runs on CUDA under torch.cuda.set_sync_debug_mode("error")."""
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            _exchange_without_host_reads(monkeypatch, backend, torch.device("cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        _exchange_without_host_reads(monkeypatch, backend, torch.device(device))


def _exchange_without_host_reads(monkeypatch, backend, device):
    wire, host_reads = FakeWire(), []
    monkeypatch.setattr(dist, "isend", wire.isend)
    monkeypatch.setattr(dist, "irecv", wire.irecv)
    for name in ("item", "tolist", "__float__", "cpu", "numpy"):  # what waits for a GPU
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            host_reads.append((_name, self.device.type))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: host_reads.append(("synchronize", None)))
    first, second = (StageComm(r, r - 1 if r else None, None if r else 1, r, device, TIMEOUT_S,
                               fake_groups(r, backend)) for r in (0, 1))
    activation = (torch.empty(4, 8, device=device), torch.empty(4, 3, dtype=torch.bfloat16, device=device))

    for m in (0, 1):
        first.send(activation, 1, f"activation of micro-batch {m}", ACTIVATION)
    second.recv(0, "activation of micro-batch 0 from stage 0", 0, ACTIVATION, expect_batch=4)
    second.expect(0, "the next activation", ACTIVATION)  # a header posted ahead, as the engine does
    got = second.recv(0, "activation of micro-batch 1 from stage 0", 1, ACTIVATION, expect_batch=4)
    second.send(got, 0, "gradient of micro-batch 1", GRADIENT)
    back = first.recv(1, "gradient of micro-batch 1 from stage 1", 1, GRADIENT, expect_like=activation)
    first.wait_sends()
    second.wait_sends()

    assert [(t.shape, t.dtype, t.device) for t in back] == [(t.shape, t.dtype, t.device) for t in activation]
    assert host_reads == [("tolist", "cpu")] * 3  # one decoded header per message, nothing else
    headers = [t for t in wire.transfers if t[1] == ("headers",)]
    payloads = [t for t in wire.transfers if t[1] != ("headers",)]
    assert {kind for *_, kind in headers} == {"cpu"} and len(headers) == 6
    assert {kind for *_, kind in payloads} == {device.type} and len(payloads) == 12
    assert {group for _, group, _ in payloads} == {("lane", lane_of(0, 1, ACTIVATION)),
                                                 ("lane", lane_of(1, 0, GRADIENT))}
    bound = timedelta(seconds=TIMEOUT_S)
    assert {timeout for kind, timeout in wire.waits if kind == "cpu"} == {bound}
    payload_bounds = {timeout for kind, timeout in wire.waits if kind == device.type}
    assert payload_bounds == ({None} if backend == "nccl" else {bound})


# ---- the lanes on NCCL: sends that wait for their receive ----------------------------------------
_MESSAGES = {Kind.SEND_ACT: (ACTIVATION, True), Kind.RECV_ACT: (ACTIVATION, False),
             Kind.SEND_GRAD: (GRADIENT, True), Kind.RECV_GRAD: (GRADIENT, False)}


def completes_on_nccl_streams(lists, placement, lane, stream_per_peer=True) -> bool:
    """Replay every rank's list (its chunks placed by `placement`, the schedule's
    chunk_placement) as NCCL would run it with `lane(src, dst, channel)` choosing the
    group: the host posts everything at once (it never waits for the device); operations between
    two ranks on one group run in posting order on one stream (stream_per_peer=False: one stream
    per group for all peers, as when torch runs p2p on the group's collective communicator), and
    a send completes only with its receive (the worst case NCCL allows); an operation starts
    after the compute listed before it (the NCCL stream waits for the compute stream at enqueue);
    a compute starts after every receive listed before it. True when everything completes."""
    streams = defaultdict(deque)  # (rank, lane, peer) -> (is_send, computes before, receive index, peer)
    receives_before = {}  # rank -> receives listed before each compute
    for rank, actions in lists.items():
        computes, n_received = [], 0
        for action in actions:
            if action.kind in (Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT):
                computes.append(n_received)
            elif action.kind in _MESSAGES:
                channel, sends = _MESSAGES[action.kind]
                peer = message_peer(placement, rank, action)
                src, dst = (rank, peer) if sends else (peer, rank)
                streams[rank, lane(src, dst, channel), peer if stream_per_peer else None].append(
                    (sends, len(computes), n_received, peer))
                n_received += not sends
        receives_before[rank] = computes
    computed, received = dict.fromkeys(lists, 0), {rank: set() for rank in lists}
    progressed = True
    while progressed:
        progressed = False
        for rank, needs in receives_before.items():
            while computed[rank] < len(needs) and received[rank] >= set(range(needs[computed[rank]])):
                computed[rank] += 1
                progressed = True
        for (rank, lane_id, _), ops in list(streams.items()):
            if not ops or not ops[0][0]:
                continue
            peer = ops[0][3]
            other = streams[peer, lane_id, rank if stream_per_peer else None]
            if other and not other[0][0] and other[0][3] == rank \
                    and ops[0][1] <= computed[rank] and other[0][1] <= computed[peer]:
                ops.popleft()
                received[peer].add(other.popleft()[2])
                progressed = True
    return not any(streams.values()) and all(computed[r] == len(n) for r, n in receives_before.items())


@functools.cache
def schedule_cases(max_k=8, max_m=16, max_v=4) -> list:
    """(schedule, K, M, V, every rank's list) of every valid case."""
    return list(_schedule_cases(max_k, max_m, max_v))


def _schedule_cases(max_k, max_m, max_v):
    for schedule in SCHEDULES:
        for k in range(2, max_k + 1):
            for m in range(1, max_m + 1):
                for v in range(1, max_v + 1):
                    try:
                        check_schedule(schedule, k, m, v)
                    except ScheduleError:
                        continue
                    yield schedule, k, m, v, {r: train_actions(schedule, r, k, m, v) for r in range(k)}


@pytest.mark.parametrize("stream_per_peer", [True, False])
def test_payload_lanes_keep_every_schedule_deadlock_free_when_nccl_sends_wait_for_receives(stream_per_peer):
    stuck = [case[:4] for case in schedule_cases()
             if not completes_on_nccl_streams(case[4], chunk_placement(case[0], case[1], case[3]), lane_of,
                                              stream_per_peer)]
    assert stuck == []


@pytest.mark.parametrize("groups,schedule,k,m,v", [
    (lambda src, dst, channel: 0, "1f1b", 2, 2, 1),  # one group for everything (the default group)
    (lambda src, dst, channel: channel, "interleaved", 2, 2, 2),  # one group per channel
])
def test_fewer_groups_than_lanes_deadlock_a_real_schedule_on_nccl(groups, schedule, k, m, v):
    lists = {r: train_actions(schedule, r, k, m, v) for r in range(k)}
    placement = chunk_placement(schedule, k, v)
    assert not completes_on_nccl_streams(lists, placement, groups)
    assert completes_on_nccl_streams(lists, placement, lane_of)


# ---- one reason per failure, whatever the backend ---------------------------------------------
@pytest.mark.parametrize("exc,reason", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                  "3000ms for recv operation to complete"), "timed out after 3 s"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                  "[127.0.0.1]:41285"), "lost the connection (the peer process exited or crashed)"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset by peer"),
     "lost the connection (the peer process exited or crashed)"),
    (dist.DistBackendError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
                           "OpType=RECV, NumelIn=4096, NumelOut=4096, Timeout(ms)=3000) ran for 3004 "
                           "milliseconds before timing out."), "timed out after 3 s"),
    (dist.DistBackendError("NCCL communicator was aborted on rank 1.  Original reason for failure was: "
                           "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
                           "OpType=SEND) ran for 3004 milliseconds before timing out."),
     "timed out after 3 s"),
    (dist.DistBackendError("[Rank 0] Work WorkNCCL(SeqNum=3, OpType=RECV) timed out in blocking wait "
                           "(TORCH_NCCL_BLOCKING_WAIT=1)."), "timed out after 3 s"),
    (dist.DistBackendError("NCCL communicator was aborted on rank 0. "),
     "found the NCCL communicator aborted (an earlier operation failed or timed out)"),
    (dist.DistBackendError("NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:317, remote "
                           "process exited or there was a network error, NCCL version 2.21.5\n"
                           "ncclRemoteError: A call failed possibly due to a network error or a remote "
                           "process exiting prematurely.\nLast error:\nNET/IB : Got completion from peer"),
     "lost the connection (NCCL: a peer process exited or the network failed)"),
    (dist.DistBackendError("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, "
                           "unhandled system error\nncclSystemError: System call (e.g. socket, malloc) "
                           "or external library call failed or device error. \nLast error:\nsocketPoll"),
     "failed in NCCL (ncclSystemError: a system call or the network failed, or a peer exited)"),
    (dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, internal error\n"
                           "ncclInternalError: Internal check failed."),
     "failed in NCCL (ncclInternalError)"),
    (RuntimeError("Tensors must be CUDA and dense\nmore"), "failed (Tensors must be CUDA and dense)"),
])
def test_gloo_and_nccl_failures_get_one_reason_each(exc, reason):
    assert describe_comm_failure(exc, timeout_s=3.0) == reason


# ---- the CUDA device is current, whoever made the process group -------------------------------
def test_cuda_device_is_made_current_when_the_caller_initialised_the_group(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    made_here = not dist.is_initialized()  # in-process runs of earlier tests may have left one
    if made_here:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        layout = init_process_groups(n_stages=1, dp=1, timeout_s=10, device="auto")
    finally:
        if made_here:
            dist.destroy_process_group()
    assert made_current == [torch.device("cuda", 3)] and layout.device == torch.device("cuda", 3)

