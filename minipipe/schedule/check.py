"""PURE: run every rank's action list together, with unit compute times, and prove it sound.

    report = simulate({rank: actions}, K, M, V)     # raises ScheduleError naming rank and action
    report.bubble, report.peak_in_flight, report.starts

The simulation follows the engine's transport: a send never blocks and appends to a FIFO channel
(src, dst, activation | gradient); a receive blocks until its channel has a message and must get
exactly the (chunk, micro-batch) it names. A compute action takes one time unit (one chunk's
work; with V chunks a stage's work is V units), or with `times=(f, b, w)` a forward f, an input
gradient I b, a weight gradient W w and a fused backward B b + w (the zero-bubble paper's F:B:W);
it may only start once its input is here: the batch (global chunk 0), an activation received or
handed over locally (K = 1), the loss (last chunk), a gradient, or for W its own I. It proves,
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
    Action,
    Kind,
    ScheduleError,
    bubble_fraction,
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
             virtual_stages: int = 1, times: tuple | None = None) -> Report:
    k, v = n_stages, virtual_stages
    duration = _durations(times)
    last_chunk = k * v - 1
    if sorted(lists) != list(range(k)):
        raise ScheduleError(f"expected action lists for ranks 0..{k - 1}, got {sorted(lists)}")
    pcs, clock = [0] * k, [0] * k
    channels: dict[tuple, list] = {}  # (src, dst, kind of message) -> [(unit, time sent)]
    ready = [dict() for _ in range(k)]  # rank -> {(direction, chunk, m): time the input is here}
    done = [dict() for _ in range(k)]  # rank -> {(kind, chunk, m): end time}
    starts = [dict() for _ in range(k)]
    in_flight, peak = [0] * k, [0] * k
    stashed, peak_stashed = [0] * k, [0] * k

    def fail(rank, action, why):
        raise ScheduleError(f"rank {rank}, action {pcs[rank]} ({action}): {why}")

    def step(rank, action) -> bool:
        """Run one action of `rank`; False if it must wait for a message."""
        c, m = action.chunk * k + rank, action.microbatch
        if m is not None and (action.rank_chunks != v or not 0 <= action.chunk < v):
            fail(rank, action, f"names chunk {action.chunk} of {action.rank_chunks}; with V={v} name a "
                               f"chunk 0..{v - 1} of {v}")
        if m is not None and not 0 <= m < n_microbatches:
            fail(rank, action, f"micro-batch {m} is outside 0..{n_microbatches - 1}")
        if action.kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
            forward = action.kind is Kind.SEND_ACT
            made = [(kind, action.chunk, m) for kind in ((Kind.FORWARD,) if forward else BACKWARDS)]
            if not any(unit in done[rank] for unit in made) or (c == last_chunk if forward else c == 0):
                fail(rank, action, "sends a value this rank has not computed, or that has no receiver")
            dst = (rank + (1 if forward else -1)) % k
            unit = (c + (1 if forward else -1), m)
            channels.setdefault((rank, dst, forward), []).append((unit, clock[rank]))
        elif action.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
            forward = action.kind is Kind.RECV_ACT
            src = (rank - (1 if forward else -1)) % k
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
                needs = _input(forward, c, m, last_chunk, k, ready[rank], done[rank], rank)
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
    _check_complete(lists, done, k, n_microbatches, v)
    for (src, dst, _), queue in channels.items():
        if queue:
            raise ScheduleError(f"rank {src} sent {len(queue)} message(s) rank {dst} never receives")
    span = max(max(d.values(), default=0) for d in done)
    bubble = [1 - sum(duration[kind] for kind, _, _ in d) / span if span else 0.0 for d in done]
    return Report(bubble, peak, peak_stashed, starts, span)


def _input(forward, c, m, last_chunk, k, ready, done, rank):
    """When the input of this forward/backward is on the rank, or None if it never will be."""
    if forward:
        if c == 0:
            return 0
        if k == 1:  # the previous chunk lives here: a local hand-off
            return done.get((Kind.FORWARD, c - 1, m))
        return ready.get(("act", c, m))
    if c == last_chunk:
        return done.get((Kind.FORWARD, c // k, m))  # the loss is made by this chunk's forward
    if k == 1:
        return next((done[kind, c + 1, m] for kind in BACKWARDS if (kind, c + 1, m) in done), None)
    return ready.get(("grad", c, m))


def _check_complete(lists, done, k, n_microbatches, v):
    for rank in range(k):
        want = set()
        for chunk in range(v):
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


def schedule_lists(schedule: str, n_stages: int, n_microbatches: int, virtual_stages: int = 1):
    """({rank: training actions}, V) of a named schedule or of a CSV file (csv_format.py)."""
    if schedule.endswith(".csv"):
        return read_csv(schedule, n_stages, n_microbatches)
    return {r: train_actions(schedule, r, n_stages, n_microbatches, virtual_stages)
            for r in range(n_stages)}, virtual_stages


def check(schedule: str, n_stages: int, n_microbatches: int, virtual_stages: int = 1,
          times: tuple | None = None) -> Report:
    """Simulate a schedule's lists for all ranks (unit ticks, or times=(f, b, w))."""
    lists, v = schedule_lists(schedule, n_stages, n_microbatches, virtual_stages)
    return simulate(lists, n_stages, n_microbatches, v, times)


def _simulated(schedule: str, k: int, m: int, v: int) -> bool:
    """Split backwards and files have no closed formula: their bubble is the simulation's."""
    return schedule not in SCHEDULES or any(a.kind is Kind.BACKWARD_INPUT for a in train_actions(schedule, 0, k, m, v))


def theory_bubble(schedule: str, n_stages: int, n_microbatches: int, virtual_stages: int = 1) -> float:
    """The bubble fraction: the literature's formula for the fused-backward schedules, the
    simulation at F = I = W (a fused B = I + W) for the split ones and for files."""
    k, m, v = n_stages, n_microbatches, virtual_stages
    if _simulated(schedule, k, m, v):
        return max(check(schedule, k, m, v, (1, 1, 1)).bubble)
    return bubble_fraction(k, m, v)


def ideal_bubble(schedule: str, n_stages: int, n_microbatches: int, virtual_stages: int = 1) -> str:
    """theory_bubble as text, with its formula."""
    k, m, v = n_stages, n_microbatches, virtual_stages
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
