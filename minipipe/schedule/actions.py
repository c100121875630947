"""PURE: (schedule, rank, K, M, V) -> the ordered actions of one training step on that rank.

Six schedules, each a compute order per rank; the messages follow from it (`with_messages`):

    gpipe        fill-drain (Huang et al. 2019, Fig. 2): F0..F(M-1), then B(M-1)..B0.
    1f1b         PipeDream-flush (Narayanan et al. 2021): K-1-r warm-up forwards on rank r, then
                 one forward one backward, then the cool-down backwards; the same synchronous
                 update. At most K-r micro-batches are in flight on rank r, instead of M.
    zb-h1        zero bubble at 1F1B's memory (Qi et al. 2024; minipipe.schedule.zero_bubble): each
                 backward runs as I (input gradient, sent upstream at once) and W (weight
                 gradients, deferred into the bubble).
    zbv          ZB-V (Qi et al. 2024, section 6): two chunks per rank in the V placement (below),
                 split backwards; K-1 idle units per rank at F = I = W (check.v_schedule_idle),
                 at 1F1B's activation memory.
    dualpipev    DeepSeek's DualPipe cut in a V (deepseek-ai/DualPipe's DualPipeV): the V placement,
                 a steady state of forward / fused-backward pairs of the two chunks, split
                 backwards in the ramp and the tail.
    interleaved  Megatron-LM's interleaved 1F1B (Narayanan et al. 2021, section 2.2): the model is
                 cut into K*V chunks and chunk c runs on rank c mod K, so rank r holds its chunks
                 v = 0..V-1 (global chunk v*K + r). Forwards go in groups of K micro-batches,
                 chunk by chunk; (K-1-r)*2 + (V-1)*K warm-up forwards, then 1F1B.

Constraints (refused with a ScheduleError before any rank waits): K, M >= 1; gpipe, 1f1b and
zb-h1 run one chunk per rank (V = 1); interleaved needs V >= 2 and M a multiple of K (its groups of
K); zbv and dualpipev run exactly two chunks per rank, V = 2 (implied when --virtual-stages is left
out: `implied_virtual_stages`); dualpipev needs M >= 2K (its ramp and tail hold 2K micro-batches,
as torch's ScheduleDualPipeV requires).

Placement (`chunk_placement`, the one definition): the model is cut into K*V contiguous chunks
and `placement[c]` is the rank that runs model chunk c. "loop": chunk c on rank c mod K (one
chunk per rank, or interleaved's loops). "v": two chunks per rank in a V, rank r holds chunks r
and 2K-1-r, so chunk K-1 hands over to chunk K on the same rank (the zero-bubble V schedules).
A schedule file names its own placement (csv_format.py). A rank's chunks in ascending order are
its local chunks 0..V-1 (`chunks_on`); an action's `chunk` is that local index (always 0 when
V = 1, and then left out of its name: `F3`, not `F3c0`). `recv_act`/`send_act` carry activations
from chunk c to c+1 (from rank placement[c] to rank placement[c+1]), `recv_grad`/`send_grad`
carry gradients back; between two chunks on one rank the hand-off is local: no message is listed
and the engine passes the value in memory.

Invariant the engine relies on, and `minipipe.schedule.check` proves for any list: on every
channel (src, dst, activation|gradient) the k-th send and the k-th receive name the same
(chunk, micro-batch). `backward` (or `backward_input`, when the backward is split) includes the
re-materialising recompute of its forward; `backward_weight` runs after it, on its graph.
No torch in here.
"""
import enum
from dataclasses import dataclass

from minipipe.errors import ConfigError
from minipipe.schedule.zero_bubble import dualpipev_order, zb_h1_order, zbv_order

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zbv", "dualpipev")
V_PLACED = ("zbv", "dualpipev")  # the schedules that run in the V placement


class ScheduleError(ConfigError):
    """A schedule cannot run with these K, M, V (or a hand-made action list is unsound)."""


class Kind(enum.Enum):
    RECV_ACT = "recv_act"
    FORWARD = "forward"
    SEND_ACT = "send_act"
    RECV_GRAD = "recv_grad"
    BACKWARD = "backward"
    BACKWARD_INPUT = "backward_input"  # the input-gradient half of a split backward
    BACKWARD_WEIGHT = "backward_weight"  # the weight-gradient half, later, on the same graph
    SEND_GRAD = "send_grad"
    ALLREDUCE = "allreduce"
    STEP = "step"


# torch.distributed.pipelining's letters (its CSV format): I and W are the halves of a split B
_SHORT = {Kind.FORWARD: "F", Kind.BACKWARD: "B", Kind.BACKWARD_INPUT: "I", Kind.BACKWARD_WEIGHT: "W"}
BACKWARDS = (Kind.BACKWARD, Kind.BACKWARD_INPUT)  # a backward that gives the input's gradient


@dataclass(frozen=True)
class Action:
    kind: Kind
    microbatch: int | None = None  # None for allreduce and step
    chunk: int = 0  # the rank's own chunk 0..V-1 (its model chunk: chunks_on(placement, rank)[chunk])
    rank_chunks: int = 1  # V, the chunks the rank holds: the chunk is named when V > 1

    def __post_init__(self):
        object.__setattr__(self, "kind", Kind(self.kind))  # also accepts the kind's name string
        if (self.microbatch is None) != (self.kind in (Kind.ALLREDUCE, Kind.STEP)):
            raise ValueError(f"action {self.kind.value!r} got microbatch={self.microbatch!r}")

    def __str__(self):
        if self.microbatch is None:
            return self.kind.value
        text = f"{_SHORT.get(self.kind, self.kind.value)}{self.microbatch}"
        return text if self.rank_chunks == 1 else f"{text}c{self.chunk}"


def check_schedule(schedule: str, n_stages: int, n_microbatches: int, virtual_stages: int = 1) -> None:
    """Raise ScheduleError naming the constraint that (schedule, K, M, V) breaks."""
    k, m, v = n_stages, n_microbatches, virtual_stages
    if schedule not in SCHEDULES:
        raise ScheduleError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if k < 1 or m < 1 or v < 1:
        raise ScheduleError(f"need stages, micro-batches and virtual stages >= 1, got K={k}, M={m}, V={v}")
    if schedule in V_PLACED:
        if v != 2:
            raise ScheduleError(f"--schedule {schedule} runs two model chunks per stage in a V (stage r "
                                f"holds chunks r and 2K-1-r): --virtual-stages must be 2, or left out "
                                f"(got {v})")
        if schedule == "dualpipev" and m < 2 * k:
            raise ScheduleError(f"--schedule dualpipev needs --microbatches >= 2 x {k} stages = {2 * k} "
                                f"(got {m}): its ramp and its tail hold 2K micro-batches")
    elif schedule != "interleaved" and v != 1:
        raise ScheduleError(f"--schedule {schedule} runs one model chunk per stage: --virtual-stages "
                            f"must be 1 (got {v}); use --schedule interleaved for V > 1")
    if schedule == "interleaved":
        if v < 2:
            raise ScheduleError("--schedule interleaved needs --virtual-stages >= 2 (V = 1 is 1f1b)")
        if m % k:
            raise ScheduleError(f"--schedule interleaved runs micro-batches in groups of K={k}: "
                                f"--microbatches {m} must be a multiple of {k}")


def _gpipe_order(rank, k, m, v):
    return [(Kind.FORWARD, 0, i) for i in range(m)] + [(Kind.BACKWARD, 0, i) for i in reversed(range(m))]


def _one_f_one_b_order(rank, k, m, v):
    warmup = min(k - 1 - rank, m)
    order = [(Kind.FORWARD, 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [(Kind.FORWARD, 0, warmup + i), (Kind.BACKWARD, 0, i)]
    return order + [(Kind.BACKWARD, 0, i) for i in range(m - warmup, m)]


def _interleaved_order(rank, k, m, v):
    """Megatron's order over the M*V (chunk, micro-batch) units of the rank, indexed by j."""
    def unit(j, forward):
        chunk = (j // k) % v
        return (Kind.FORWARD if forward else Kind.BACKWARD, chunk if forward else v - 1 - chunk,
                (j // (k * v)) * k + j % k)
    total = m * v
    warmup = min((k - 1 - rank) * 2 + (v - 1) * k, total)
    order = [unit(j, True) for j in range(warmup)]
    for j in range(total - warmup):
        order += [unit(warmup + j, True), unit(j, False)]
    return order + [unit(j, False) for j in range(total - warmup, total)]


_LETTERS = {"F": Kind.FORWARD, "B": Kind.BACKWARD, "I": Kind.BACKWARD_INPUT, "W": Kind.BACKWARD_WEIGHT}


def _from_letters(order_fn):
    return lambda *args: [(_LETTERS[letter], chunk, m) for letter, chunk, m in order_fn(*args)]


def implied_virtual_stages(schedule: str) -> int:
    """V when --virtual-stages is left out: 2 for the V schedules, else 1 (interleaved needs it given)."""
    return 2 if schedule in V_PLACED else 1


def loop_placement(n_stages: int, virtual_stages: int = 1) -> tuple[int, ...]:
    """Chunk c on rank c mod K: one chunk per rank, or V loops over the ranks (interleaved)."""
    return tuple(c % n_stages for c in range(n_stages * virtual_stages))


def v_placement(n_stages: int) -> tuple[int, ...]:
    """Two chunks per rank in a V: rank r holds chunks r and 2K-1-r (ZB-V, DualPipeV)."""
    return tuple(c if c < n_stages else 2 * n_stages - 1 - c for c in range(2 * n_stages))


def chunk_placement(schedule: str, n_stages: int, virtual_stages: int = 1) -> tuple[int, ...]:
    """The rank of each model chunk 0..K*V-1 under a named schedule."""
    return v_placement(n_stages) if schedule in V_PLACED else loop_placement(n_stages, virtual_stages)


def chunks_on(placement: tuple[int, ...], rank: int) -> list[int]:
    """The model chunks `rank` runs, in its local order (local chunk v is the v-th of them)."""
    return [c for c, r in enumerate(placement) if r == rank]


def message_peer(placement: tuple[int, ...], rank: int, action: Action) -> int:
    """The stage at the other end of a receive or send of `rank`: the neighbouring chunk's rank."""
    c = chunks_on(placement, rank)[action.chunk]
    toward_next = action.kind in (Kind.SEND_ACT, Kind.RECV_GRAD)
    return placement[c + 1 if toward_next else c - 1]


_ORDERS = {"gpipe": _gpipe_order, "1f1b": _one_f_one_b_order, "interleaved": _interleaved_order,
           "zb-h1": _from_letters(zb_h1_order), "zbv": _from_letters(lambda r, k, m, v: zbv_order(r, k, m)),
           "dualpipev": _from_letters(lambda r, k, m, v: dualpipev_order(r, k, m))}


def with_messages(order, rank: int, placement: tuple[int, ...]) -> list[Action]:
    """Receive right before the compute that needs the value; send right after it is made. Only
    between chunks on two ranks: a neighbour on this rank hands over in memory."""
    own = chunks_on(placement, rank)
    last_chunk, v = len(placement) - 1, len(own)

    def remote(c):  # chunk c exists and runs on another rank
        return 0 <= c <= last_chunk and placement[c] != rank
    actions = []
    for kind, chunk, m in order:
        c = own[chunk]  # the model's chunk
        if kind is Kind.FORWARD:
            needs, gives = (Kind.RECV_ACT if remote(c - 1) else None), (Kind.SEND_ACT if remote(c + 1) else None)
        elif kind is Kind.BACKWARD_WEIGHT:  # nothing to receive or send
            needs = gives = None
        else:
            needs, gives = (Kind.RECV_GRAD if remote(c + 1) else None), (Kind.SEND_GRAD if remote(c - 1) else None)
        if needs:
            actions.append(Action(needs, m, chunk, v))
        actions.append(Action(kind, m, chunk, v))
        if gives:
            actions.append(Action(gives, m, chunk, v))
    return actions


def train_actions(schedule: str, rank: int, n_stages: int, n_microbatches: int,
                  virtual_stages: int = 1) -> list[Action]:
    """One training step of `rank`: every micro-batch forward and backward (fused, or I then W)
    on each of its chunks, in the schedule's order, then the dp all-reduce and the optimizer step."""
    check_schedule(schedule, n_stages, n_microbatches, virtual_stages)
    if not 0 <= rank < n_stages:
        raise ScheduleError(f"rank {rank} is outside 0..{n_stages - 1}")
    order = _ORDERS[schedule](rank, n_stages, n_microbatches, virtual_stages)
    return with_messages(order, rank, chunk_placement(schedule, n_stages, virtual_stages)) + [
        Action(Kind.ALLREDUCE), Action(Kind.STEP)]


def forward_part(actions: list[Action]) -> list[Action]:
    """The forward half of a training list (evaluation): the same forward order and messages,
    so it pairs up across ranks whenever the training list does."""
    return [a for a in actions if a.kind in (Kind.RECV_ACT, Kind.FORWARD, Kind.SEND_ACT)]


def bubble_fraction(n_stages: int, n_microbatches: int, virtual_stages: int = 1) -> float:
    """The idle share of each rank between the first forward and the last backward, with equal
    forward and backward times: (K-1)/(M+K-1) for gpipe and 1f1b (GPipe section 2.2), and
    (K-1)/(V*M+K-1) for interleaved, whose bubble is (K-1)/V chunk-times of V*M (Narayanan et al.
    2021, section 2.2.1: bubble / ideal = (1/V)(K-1)/M). `schedule_check` simulates the lists
    and finds exactly these."""
    k, m, v = n_stages, n_microbatches, virtual_stages
    return (k - 1) / (v * m + k - 1)
