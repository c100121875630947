"""PURE: run every rank's action list together, with unit compute times, and prove it sound.

    report = simulate({rank: actions}, K, M, V)     # raises ScheduleError naming rank and action
    report.bubble, report.peak_in_flight, report.starts

The simulation follows the engine's transport: a send never blocks and appends to a FIFO channel
(src, dst, activation | gradient); a receive blocks until its channel has a message and must get
exactly the (chunk, micro-batch) it names. A compute action takes one time unit (one chunk's
work; with V chunks a stage's work is V units), or with `times=(f, b, w)` a forward f, an input
gradient I b, a weight gradient W w and a fused backward B b + w (the zero-bubble paper's F:B:W);
it may only start once its input is here: the batch (model chunk 0), an activation received or
handed over locally (the neighbouring chunk on the same rank), the loss (last chunk), a gradient,
or for W its own I. Which rank runs each model chunk is `placement` (actions.chunk_placement). It proves,
for the lists given:
- no deadlock: every rank reaches its end (else: each blocked rank and the action it waits on);
- pairing: the k-th send and the k-th receive of every channel name the same unit;
- completeness: every (chunk, micro-batch) runs F once, then either B once or I once and later
  W once, on its rank; then allreduce, step.
It measures each rank's idle share between time 0 and the last compute of any rank (the bubble)
and the peak number of micro-batches forwarded but not yet done with their backward (B, or W
when split) on each rank (in flight: the activations a stage holds).
"""
from dataclasses import dataclass

from minipipe.schedule.actions import (
    BACKWARDS,
    SCHEDULES,
    V_PLACED,
    Action,
    Kind,
    ScheduleError,
    bubble_fraction,
    chunk_placement,
    chunks_on,
    loop_placement,
    train_actions,
)
from minipipe.schedule.csv_format import read_csv

BUBBLE = "."
_COMPUTE = (Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT)


def _durations(times) -> dict:
    """Time of each compute kind: unit ticks, or the (f, b, w) of the zero-bubble paper."""
    f, b, w = times or (1, 1, 1)
    return {Kind.FORWARD: f, Kind.BACKWARD: 1 if times is None else b + w, Kind.BACKWARD_INPUT: b,
            Kind.BACKWARD_WEIGHT: w}


@dataclass
class Report:
    bubble: list[float]  # per rank: idle share of the step's span
    peak_in_flight: list[int]  # per rank: most micro-batch chunks between their F and B (or W)
    peak_stashed: list[int]  # per rank: most between their F and B (or I): re-materialisation's stash
    starts: list[dict]  # per rank: Action -> start time of each compute action
    span: float  # time from the first forward to the last compute


def simulate(lists: dict[int, list[Action]], n_stages: int, n_microbatches: int,
             virtual_stages: int = 1, times: tuple | None = None,
             placement: tuple[int, ...] | None = None) -> Report:
    """placement: the rank of each model chunk (actions.chunk_placement; default: chunk c on rank c mod K)."""
    k, v = n_stages, virtual_stages
    placement = placement or loop_placement(k, v)
    own = [chunks_on(placement, rank) for rank in range(k)]
    local = {c: own[r].index(c) for c, r in enumerate(placement)}  # model chunk -> its rank's local index
    duration = _durations(times)
    last_chunk = len(placement) - 1
    if sorted(lists) != list(range(k)):
        raise ScheduleError(f"expected action lists for ranks 0..{k - 1}, got {sorted(lists)}")
    pcs, clock = [0] * k, [0] * k
    channels: dict[tuple, list] = {}  # (src, dst, kind of message) -> [(unit, time sent)]
    ready = [dict() for _ in range(k)]  # rank -> {(direction, model chunk, m): time the input is here}
    done = [dict() for _ in range(k)]  # rank -> {(kind, chunk, m): end time}
    starts = [dict() for _ in range(k)]
    in_flight, peak = [0] * k, [0] * k
    stashed, peak_stashed = [0] * k, [0] * k

    def fail(rank, action, why):
        raise ScheduleError(f"rank {rank}, action {pcs[rank]} ({action}): {why}")

    def remote(rank, c):  # model chunk c exists and runs on another rank
        return 0 <= c <= last_chunk and placement[c] != rank

    def input_time(rank, action, c, m):
        """When the input of this forward/backward is on the rank, or None if it never will be."""
        if action.kind is Kind.FORWARD:
            if c == 0:
                return 0
            if not remote(rank, c - 1):  # the previous chunk lives here: a local hand-off
                return done[rank].get((Kind.FORWARD, local[c - 1], m))
            return ready[rank].get(("act", c, m))
        if c == last_chunk:
            return done[rank].get((Kind.FORWARD, action.chunk, m))  # the loss is made by this chunk's forward
        if not remote(rank, c + 1):
            return next((done[rank][kind, local[c + 1], m] for kind in BACKWARDS
                         if (kind, local[c + 1], m) in done[rank]), None)
        return ready[rank].get(("grad", c, m))

    def step(rank, action) -> bool:
        """Run one action of `rank`; False if it must wait for a message."""
        m, v_rank = action.microbatch, len(own[rank])
        if m is not None and (action.rank_chunks != v_rank or not 0 <= action.chunk < v_rank):
            fail(rank, action, f"names chunk {action.chunk} of {action.rank_chunks}; this rank holds "
                               f"{v_rank}: name a chunk 0..{v_rank - 1} of {v_rank}")
        if m is not None and not 0 <= m < n_microbatches:
            fail(rank, action, f"micro-batch {m} is outside 0..{n_microbatches - 1}")
        c = own[rank][action.chunk] if m is not None else None
        if action.kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
            forward = action.kind is Kind.SEND_ACT
            made = [(kind, action.chunk, m) for kind in ((Kind.FORWARD,) if forward else BACKWARDS)]
            to = c + (1 if forward else -1)
            if not any(unit in done[rank] for unit in made) or not remote(rank, to):
                fail(rank, action, "sends a value this rank has not computed, or that no other rank receives")
            channels.setdefault((rank, placement[to], forward), []).append(((to, m), clock[rank]))
        elif action.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
            forward = action.kind is Kind.RECV_ACT
            frm = c - (1 if forward else -1)
            if not remote(rank, frm):
                fail(rank, action, "receives a value no other rank sends (its chunk has no neighbour on another rank)")
            src = placement[frm]
            queue = channels.get((src, rank, forward), [])
            if not queue:
                return False
            (sent_c, sent_m), sent_at = queue.pop(0)
            if (sent_c, sent_m) != (c, m):
                fail(rank, action, f"rank {src} sent the {'activation' if forward else 'gradient'} "
                                   f"of chunk {sent_c} micro-batch {sent_m} first: sends and receives "
                                   "of a channel must name the same units in the same order")
            ready[rank][("act" if forward else "grad", c, m)] = sent_at
        elif action.kind in _COMPUTE:
            forward = action.kind is Kind.FORWARD
            key = (action.kind, action.chunk, m)
            if key in done[rank]:
                fail(rank, action, "runs twice")
            if not forward and (Kind.FORWARD, action.chunk, m) not in done[rank]:
                fail(rank, action, "backward before its forward")
            if action.kind in BACKWARDS and any((kind, action.chunk, m) in done[rank] for kind in BACKWARDS):
                fail(rank, action, "a second backward of the same unit")
            if action.kind is Kind.BACKWARD_WEIGHT:
                needs = done[rank].get((Kind.BACKWARD_INPUT, action.chunk, m))
                if needs is None:
                    fail(rank, action, "weight gradient before its input gradient (I)")
            else:
                needs = input_time(rank, action, c, m)
            if needs is None:
                fail(rank, action, "its input was never received (a receive is missing before it)")
            start = max(clock[rank], needs)
            starts[rank][action] = start
            clock[rank] = start + duration[action.kind]
            done[rank][key] = clock[rank]
            in_flight[rank] += 1 if forward else -(action.kind is not Kind.BACKWARD_INPUT)
            stashed[rank] += 1 if forward else -(action.kind in BACKWARDS)
            peak[rank] = max(peak[rank], in_flight[rank])
            peak_stashed[rank] = max(peak_stashed[rank], stashed[rank])
        return True

    while any(pc < len(lists[r]) for r, pc in enumerate(pcs)):
        progressed = False
        for rank in range(k):
            while pcs[rank] < len(lists[rank]) and step(rank, lists[rank][pcs[rank]]):
                pcs[rank] += 1
                progressed = True
        if not progressed:
            blocked = "; ".join(f"rank {r} waits at action {pcs[r]} ({lists[r][pcs[r]]})"
                                for r in range(k) if pcs[r] < len(lists[r]))
            raise ScheduleError(f"deadlock: {blocked}")
    _check_complete(lists, done, own, n_microbatches)
    for (src, dst, _), queue in channels.items():
        if queue:
            raise ScheduleError(f"rank {src} sent {len(queue)} message(s) rank {dst} never receives")
    span = max(max(d.values(), default=0) for d in done)
    bubble = [1 - sum(duration[kind] for kind, _, _ in d) / span if span else 0.0 for d in done]
    return Report(bubble, peak, peak_stashed, starts, span)


def _check_complete(lists, done, own, n_microbatches):
    for rank in range(len(own)):
        want = set()
        for chunk in range(len(own[rank])):
            for m in range(n_microbatches):
                split = (Kind.BACKWARD_INPUT, chunk, m) in done[rank]
                backward = (Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT) if split else (Kind.BACKWARD,)
                want |= {(kind, chunk, m) for kind in (Kind.FORWARD, *backward)}
        missing = sorted(want - set(done[rank]), key=str)
        if missing:
            kind, chunk, m = missing[0]
            raise ScheduleError(f"rank {rank}: {kind.value} of micro-batch {m} on chunk {chunk} never "
                                f"runs ({len(missing)} units missing)")
        tail = [a.kind for a in lists[rank][-2:]]
        if tail != [Kind.ALLREDUCE, Kind.STEP] or any(
                a.kind in (Kind.ALLREDUCE, Kind.STEP) for a in lists[rank][:-2]):
            raise ScheduleError(f"rank {rank}: the list must end with allreduce, step (once each)")


def schedule_lists(schedule: str, n_stages: int, n_microbatches: int,
                   virtual_stages: int = 1) -> tuple[dict[int, list[Action]], tuple[int, ...]]:
    """({rank: training actions}, placement) of a named schedule (its constraints checked) or of a
    CSV file (csv_format.py: its placement is the file's), which is simulated here: a file that
    deadlocks or leaves a unit out raises a ScheduleError naming the rank and action."""
    k, m = n_stages, n_microbatches
    if schedule.endswith(".csv"):
        lists, placement = read_csv(schedule, k, m)
        try:
            simulate(lists, k, m, len(placement) // k, placement=placement)
        except ScheduleError as err:
            raise ScheduleError(f"--schedule {schedule}: {err}") from None
        return lists, placement
    return ({r: train_actions(schedule, r, k, m, virtual_stages) for r in range(k)},
            chunk_placement(schedule, k, virtual_stages))


def check(schedule: str, n_stages: int, n_microbatches: int, virtual_stages: int = 1,
          times: tuple | None = None) -> Report:
    """Simulate a schedule's lists for all ranks (unit ticks, or times=(f, b, w))."""
    lists, placement = schedule_lists(schedule, n_stages, n_microbatches, virtual_stages)
    return simulate(lists, n_stages, n_microbatches, len(placement) // n_stages, times, placement)


def v_schedule_idle(schedule: str, n_stages: int, n_microbatches: int) -> int:
    """Idle time units per rank of zbv and dualpipev at F = I = W = 1 (a unit is one chunk's
    forward; a rank's work is 6M units): K-1, the staircase of the ramp (rank r starts r units
    late and ends K-1-r units early) and nothing in the steady state, the zero-bubble paper's
    "about zero" (section 6) made exact; zbv with fewer than 2K-1 micro-batches never fills its
    steady state and idles 2(2K-1-M). tests/test_v_schedules.py proves it against the simulation."""
    k, m = n_stages, n_microbatches
    return max(k - 1, 2 * (2 * k - 1 - m)) if schedule == "zbv" else k - 1


def _simulated(schedule: str, k: int, m: int, v: int) -> bool:
    """Split backwards and files have no closed formula: their bubble is the simulation's."""
    return schedule not in SCHEDULES or any(a.kind is Kind.BACKWARD_INPUT for a in train_actions(schedule, 0, k, m, v))


def theory_bubble(schedule: str, n_stages: int, n_microbatches: int, virtual_stages: int = 1) -> float:
    """The bubble fraction: the literature's formula for the fused-backward schedules and the V
    schedules (at F = I = W), the simulation at F = I = W (a fused B = I + W) for zb-h1 and files."""
    k, m, v = n_stages, n_microbatches, virtual_stages
    if schedule in V_PLACED:
        idle = v_schedule_idle(schedule, k, m)
        return idle / (6 * m + idle)
    if _simulated(schedule, k, m, v):
        return max(check(schedule, k, m, v, (1, 1, 1)).bubble)
    return bubble_fraction(k, m, v)


def ideal_bubble(schedule: str, n_stages: int, n_microbatches: int, virtual_stages: int = 1) -> str:
    """theory_bubble as text, with its formula."""
    k, m, v = n_stages, n_microbatches, virtual_stages
    if schedule in V_PLACED:
        idle = v_schedule_idle(schedule, k, m)
        formula = "(K-1)/(6M+K-1)" if idle == k - 1 else "2(2K-1-M)/(6M+2(2K-1-M))"
        return f"at F = I = W {formula} = {idle}/{6 * m + idle} = {theory_bubble(schedule, k, m, v):.3f}"
    if _simulated(schedule, k, m, v):
        return f"at F = I = W (simulated) = {theory_bubble(schedule, k, m, v):.3f}"
    formula = "(K-1)/(M+K-1)" if v == 1 else "(K-1)/(V*M+K-1)"
    return f"{formula} = {k - 1}/{v * m + k - 1} = {bubble_fraction(k, m, v):.3f}"


def render_grid(schedule: str, n_stages: int, n_microbatches: int, virtual_stages: int = 1) -> str:
    """One row per rank, one column per time unit of the simulation; idle cells are the bubble."""
    report = check(schedule, n_stages, n_microbatches, virtual_stages)
    cells = [[BUBBLE] * report.span for _ in range(n_stages)]
    for rank, starts in enumerate(report.starts):
        for action, start in starts.items():
            cells[rank][start] = str(action)
    width = max(len(c) for row in cells for c in row + [str(report.span - 1)])
    label = len(f"stage {n_stages - 1}")
    lines = [" " * label + " | " + " ".join(str(t).rjust(width) for t in range(report.span))]
    lines.append("-" * len(lines[0]))
    for rank, row in enumerate(cells):
        lines.append(f"stage {rank}".ljust(label) + " | " + " ".join(c.rjust(width) for c in row))
    if any(Kind.BACKWARD_INPUT in {a.kind for a in starts} for starts in report.starts):
        lines.append("I = input gradient (the zero-bubble paper's B), W = weight gradient")
    lines.append(f"bubble fraction {ideal_bubble(schedule, n_stages, n_microbatches, virtual_stages)}; "
                 f"peak micro-batches in flight per stage: {report.peak_in_flight}")
    return "\n".join(lines)
