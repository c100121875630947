"""Point-to-point of a Tensor or a tuple of Tensors between neighbouring stages.

    comm = StageComm(rank, prev_rank, next_rank, stage, device, timeout_s, layout.p2p)
    comm.send(value, dst, what, tag)                 # non-blocking; keeps tensors alive until waited
    value = comm.recv(src, what, microbatch, tag,    # bounded wait; validated
                      expect_batch=None, expect_like=None)
    comm.wait_sends()                                # bounded wait for every outstanding send

Wire format: one fixed-size int64 header, then each tensor. The header holds (count, is_tuple,
then per tensor: dtype code, ndim, dims padded to MAX_NDIM), so shapes may change from message
to message (a smaller last micro-batch, another sequence length) and the receiver allocates
exactly what arrives. A 1-tuple stays a 1-tuple, a Tensor stays a Tensor.

No host-device synchronisation: a header is a host (CPU) tensor built from the shapes Python
already knows and travels on a gloo group (minipipe.dist.P2PGroups.headers) on every backend,
so neither building nor reading one waits for a GPU. Payloads travel on the compute device's
backend (gloo on CPU, NCCL on GPU), on one of N_LANES groups (`lane_of`). Global ranks
throughout; tags name the channel (ACTIVATION, GRADIENT): on gloo, messages with one (src, dst,
tag) arrive in the order sent. NCCL ignores tags and runs every operation between a pair of
ranks of one group on one communicator and one stream, in the order posted, where a send may
wait for its receive: one lane per (channel, direction) gives each stream the messages of one
sender in one order, which the schedule pairs (see `lane_of`).

Bounded waits: a header wait (host) is bounded by timeout_s. A payload wait on gloo is bounded
by timeout_s too; on NCCL it is `Work.wait()` without a timeout, which only makes the compute
stream wait for the transfer (a timeout would make the host poll until the data is there): the
process group's timeout bounds it, enforced by the NCCL watchdog (minipipe.dist sets it to
--timeout), which aborts the communicator and, by default, the process. A dead peer still shows
here on every backend: its header never comes and gloo reports the closed connection. A
timeout, or a peer that died, becomes a PipelineError naming this rank, stage, micro-batch and
the exchange waited on (reason: minipipe.errors.describe_comm_failure). Validation failures
(dim 0 != expect_batch; count/shapes/dtypes != expect_like) are PipelineErrors too.

Why a schedule cannot deadlock: sends never block the host (isend), so only receives can wait,
and a receive waits for a message its sender lists before anything that depends on this rank.
For GPipe by induction: forward phase from stage 0 up (stage 0 receives nothing, so it issues all
its sends; then stage s's receives complete in turn), backward phase from the last stage down.
For any list (1f1b, interleaved, hand-made), minipipe.schedule.check simulates every rank with
this transport and proves that all ranks reach the all-reduce and that the k-th send and
receive of each channel name the same (chunk, micro-batch); tests/test_schedule.py runs it for
K <= 8, M <= 16, V <= 4. On NCCL the same holds for the device streams when each lane carries
one sender's messages (tests/test_comm_nccl.py replays the schedules with sends that wait for
their receive).
"""
from datetime import timedelta

import torch
import torch.distributed as dist

from minipipe.errors import PipelineError, describe_comm_failure

MAX_TENSORS = 8
MAX_NDIM = 6
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
          torch.int64, torch.int32, torch.bool, torch.uint8)  # index = wire dtype code
_FIELDS = 2 + MAX_NDIM  # per tensor: dtype code, ndim, dims
HEADER_LEN = 2 + MAX_TENSORS * _FIELDS
ACTIVATION, GRADIENT = 0, 1  # message tags: the two channels between a pair of ranks
N_LANES = 4  # payload groups: (activation | gradient) x (to a higher | to a lower rank)


def lane_of(src: int, dst: int, channel: int) -> int:
    """The payload lane of a message: one per channel and direction. Why: NCCL puts every send and
    receive between two ranks of one group on one stream, in the order posted, and a send may
    wait there until its receive is posted. One group per pair deadlocks 1f1b at K = 2 (rank 0
    queues its next activation before the gradient it receives; rank 1 queues that gradient
    before the activation it receives); one group per channel deadlocks interleaved at K = 2
    (activations flow both ways between the two ranks). With one lane per (channel, direction),
    each stream holds one sender's messages in the order both sides list them."""
    return 2 * channel + (src < dst)


def _describe(tensors) -> str:
    return "(" + ", ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in tensors) + ")"


def _structure(is_tuple: bool, tensors) -> str:
    return (f"a tuple of {len(tensors)} " if is_tuple else "a Tensor ") + _describe(tensors)


class StageComm:
    """Sends and receives of one stage; `what` strings name the exchange for error messages
    (e.g. "activation of micro-batch 3 from stage 1")."""

    def __init__(self, rank: int, prev_rank: int | None, next_rank: int | None, stage: int,
                 device: torch.device, timeout_s: float, groups):
        """groups: minipipe.dist.P2PGroups of this rank's replica (Layout.p2p)."""
        self.rank, self.prev_rank, self.next_rank, self.stage = rank, prev_rank, next_rank, stage
        self.device = torch.device(device)
        self.timeout = timedelta(seconds=timeout_s)
        self.groups = groups
        self._payload_on_stream = groups.backend == "nccl"  # see the module docstring
        self._pending = []  # (work, tensor kept alive, what, on_stream) of sends not yet waited
        self._early_headers = {}  # (src, tag) -> (work, header) of a header receive posted ahead

    # --- sending -------------------------------------------------------------------------------
    def send(self, value, dst: int, what: str, tag: int = ACTIVATION) -> None:
        """Start sending `value` (Tensor or tuple of Tensors) to rank dst; returns at once."""
        is_tuple = isinstance(value, tuple)
        tensors = tuple(t.detach().contiguous() for t in (value if is_tuple else (value,)))
        header = torch.tensor(self._encode(tensors, is_tuple, what), dtype=torch.int64)  # host memory
        self._release_completed_sends()
        self._pending.append((self._start(dist.isend, header, dst, what, tag, self.groups.headers),
                              header, what, False))
        lane = self.groups.lanes[lane_of(self.rank, dst, tag)]
        for tensor in tensors:
            self._pending.append((self._start(dist.isend, tensor, dst, what, tag, lane), tensor, what,
                                  self._payload_on_stream))

    def _release_completed_sends(self) -> None:
        """Drop finished sends so their tensors can be freed (re-materialisation keeps only stage
        inputs: a stage must not also hold every activation it sent until the end of the step)."""
        still = []
        for work, tensor, what, on_stream in self._pending:
            if work.is_completed():  # an event query on NCCL: does not wait
                self._wait(work, f"sending {what}", None, on_stream)  # surfaces a failed send
            else:
                still.append((work, tensor, what, on_stream))
        self._pending = still

    def wait_sends(self) -> None:
        """Wait for every outstanding send (bounded); after this the sent tensors may be reused
        (on NCCL by work the host queues from now on: the compute stream waits)."""
        pending, self._pending = self._pending, []
        for work, _tensor, what, on_stream in pending:
            self._wait(work, f"sending {what}", None, on_stream)

    def _encode(self, tensors, is_tuple, what) -> list[int]:
        if not 1 <= len(tensors) <= MAX_TENSORS:
            raise PipelineError(f"rank {self.rank} (stage {self.stage}): cannot send {what}: "
                                f"{len(tensors)} tensors, the header holds 1 to {MAX_TENSORS}")
        header = [len(tensors), int(is_tuple)]
        for t in tensors:
            if t.dtype not in DTYPES or t.dim() > MAX_NDIM:
                raise PipelineError(f"rank {self.rank} (stage {self.stage}): cannot send {what}: "
                                    f"{_describe([t])}; supported: up to {MAX_NDIM} dims of {DTYPES}")
            header += [DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (MAX_NDIM - t.dim())]
        return header + [0] * (HEADER_LEN - len(header))

    # --- receiving -----------------------------------------------------------------------------
    def recv(self, src: int, what: str, microbatch: int, tag: int = ACTIVATION,
             expect_batch: int | None = None, expect_like=None):
        """Receive the next Tensor-or-tuple from rank src. The header is awaited at most
        timeout_s on the host; each tensor too on gloo, and on NCCL by the compute stream only
        (the value is usable by work queued after this call; see the module docstring).

        expect_batch: every tensor's dim 0 must equal it. expect_like: a Tensor or tuple whose
        structure, shapes and dtypes the received value must match exactly (e.g. the activation
        this stage sent, when receiving its gradient).
        """
        work, header = self._early_headers.pop((src, tag), None) or self._post_header(src, what, tag)
        self._wait(work, f"receiving {what}", microbatch, on_stream=False)
        is_tuple, tensors = self._decode(header.tolist(), what, microbatch)  # host memory: no sync
        lane = self.groups.lanes[lane_of(src, self.rank, tag)]
        for tensor in tensors:
            self._wait(self._start(dist.irecv, tensor, src, what, tag, lane), f"receiving {what}",
                       microbatch, self._payload_on_stream)
        # validated after the payload, so the channel stays in step even when we refuse a value
        self._validate(tensors, is_tuple, what, microbatch, expect_batch, expect_like)
        return tensors if is_tuple else tensors[0]

    def expect(self, src: int, what: str, tag: int = ACTIVATION) -> None:
        """Post the header receive of the next message from src on channel `tag` now, so it can
        land while this stage computes; the next recv there picks it up. Only for a message that
        will come."""
        if (src, tag) not in self._early_headers:
            self._early_headers[src, tag] = self._post_header(src, what, tag)

    def _post_header(self, src, what, tag):
        header = torch.empty(HEADER_LEN, dtype=torch.int64)  # host memory, on the gloo header group
        return self._start(dist.irecv, header, src, what, tag, self.groups.headers), header

    def _decode(self, header, what, microbatch):
        count, is_tuple = header[0], bool(header[1])
        if not 1 <= count <= MAX_TENSORS:
            raise self._error(microbatch, f"received a corrupt header for {what} (count {count}); "
                                          "both stages must run the same minipipe version")
        tensors = []
        for i in range(count):
            code, ndim, *dims = header[2 + i * _FIELDS: 2 + (i + 1) * _FIELDS]
            if not (0 <= code < len(DTYPES) and 0 <= ndim <= MAX_NDIM):
                raise self._error(microbatch, f"received a corrupt header for {what} "
                                              f"(dtype code {code}, ndim {ndim})")
            tensors.append(torch.empty(dims[:ndim], dtype=DTYPES[code], device=self.device))
        return is_tuple, tuple(tensors)

    def _validate(self, tensors, is_tuple, what, microbatch, expect_batch, expect_like):
        if expect_batch is not None:
            for i, t in enumerate(tensors):
                if t.dim() == 0 or t.shape[0] != expect_batch:
                    raise self._error(microbatch, f"{what}: expected dim 0 = {expect_batch} (the "
                                                  f"micro-batch size) in every tensor, received "
                                                  f"{_describe(tensors)} (tensor {i} differs)")
        if expect_like is not None:
            like_tuple = isinstance(expect_like, tuple)
            like = expect_like if like_tuple else (expect_like,)
            same = (is_tuple == like_tuple and len(like) == len(tensors)
                    and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(like, tensors)))
            if not same:
                raise self._error(microbatch, f"{what}: expected {_structure(like_tuple, like)}, "
                                              f"received {_structure(is_tuple, tensors)}")

    # --- bounded waits -------------------------------------------------------------------------
    def _start(self, op, tensor, peer, what, tag, group):
        try:
            return op(tensor, peer, group=group, tag=tag)
        except RuntimeError as exc:
            raise self._error(None, f"could not start {what} with rank {peer}: {exc}") from exc

    def _wait(self, work, doing: str, microbatch: int | None, on_stream: bool) -> None:
        """on_stream: an NCCL payload, awaited by the compute stream (bounded by the watchdog);
        otherwise the host waits at most timeout_s."""
        try:
            if on_stream:
                work.wait()
            else:
                work.wait(timeout=self.timeout)
        except RuntimeError as exc:  # gloo and NCCL (DistBackendError) failures alike
            reason = describe_comm_failure(exc, self.timeout.total_seconds())
            raise self._error(microbatch, f"{reason} {doing}. The other stage probably failed or "
                                          "is stuck: check its log for the first error; if it is "
                                          "only slow, raise --timeout") from exc

    def _error(self, microbatch: int | None, message: str) -> PipelineError:
        where = f"rank {self.rank} (stage {self.stage}"
        where += f", micro-batch {microbatch})" if microbatch is not None else ")"
        return PipelineError(f"{where}: {message}")
