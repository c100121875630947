"""PURE: schedules as files, in torch.distributed.pipelining's compute-only CSV form.

One row per rank, one cell per compute action `[stage][type][micro-batch]`: `2F0` is the forward
of micro-batch 0 on model chunk (torch: stage) 2, `2B0` its fused backward, `2I0` / `2W0` the
input- and weight-gradient halves of a split one. Messages are not written: they follow from the
compute order exactly as for the named schedules (actions.with_messages). The file is also the
placement: the row that names model chunk c is the rank that runs it. Every chunk 0..K*V-1 must
be on exactly one row and every row hold V of them (in ascending order they are the rank's local
chunks 0..V-1): K chunks are one per rank, 2K may be interleaved's loops or ZB-V's V.

    write_csv(path, csv_rows(lists, placement))   # check.schedule_lists's lists as a file
    lists, placement = read_csv(path, K, M)       # every rank's list back; check.simulate proves it

torch's `_PipelineScheduleRuntime._load_csv` / `_dump_csv` read and write the same files.
"""
import csv
import re
from pathlib import Path

from minipipe.schedule.actions import Action, Kind, ScheduleError, chunks_on, with_messages

_CELL = re.compile(r"(\d+)([FBIW])(\d+)")
_KINDS = {"F": Kind.FORWARD, "B": Kind.BACKWARD, "I": Kind.BACKWARD_INPUT, "W": Kind.BACKWARD_WEIGHT}
_LETTERS = {kind: letter for letter, kind in _KINDS.items()}


def csv_rows(lists: dict[int, list[Action]], placement: tuple[int, ...]) -> list[list[str]]:
    """Each rank's compute actions ({rank: actions} and the placement, as check.schedule_lists
    gives them), as CSV cells naming model chunks."""
    return [[f"{chunks_on(placement, rank)[a.chunk]}{_LETTERS[a.kind]}{a.microbatch}" for a in lists[rank]
             if a.kind in _LETTERS] for rank in range(len(lists))]


def write_csv(path, rows: list[list[str]]) -> None:
    """Writes the file, making its folder as other outputs do (--trace, --metrics-jsonl)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _cells(path) -> list[list[tuple]]:
    """Each row's (kind, model chunk, micro-batch) cells; ScheduleError names a cell that is not
    a compute action."""
    try:
        with open(path, newline="") as f:
            rows = [[cell.strip() for cell in row if cell.strip()] for row in csv.reader(f)]
    except OSError as err:
        raise ScheduleError(f"--schedule {path}: cannot read the schedule file: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ScheduleError(f"--schedule {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    cells = []
    for rank, row in enumerate(rows):
        cells.append([])
        for cell in row:
            match = _CELL.fullmatch(cell)
            if match is None:
                raise ScheduleError(f"--schedule {path}: row {rank} cell {cell!r} is not a compute action "
                                    "[chunk][F|B|I|W][micro-batch] (messages are derived, do not list them)")
            cells[-1].append((_KINDS[match[2]], int(match[1]), int(match[3])))
    return cells


def _placement(path, cells) -> tuple[int, ...]:
    """The row of each model chunk: each chunk 0..N-1 on exactly one row, V = N/K on every row."""
    rank_of = {}
    for rank, row in enumerate(cells):
        for _, chunk, _ in row:
            if rank_of.setdefault(chunk, rank) != rank:
                raise ScheduleError(f"--schedule {path}: row {rank} names chunk {chunk}, which is already on "
                                    f"row {rank_of[chunk]}; each chunk runs on exactly one rank")
    placement = tuple(rank_of.get(c, -1) for c in range(max(rank_of, default=-1) + 1))
    if not placement or -1 in placement:
        raise ScheduleError(f"--schedule {path}: no row runs chunk {(*placement, -1).index(-1)}; the chunks "
                            "must be 0..N-1, each on one row")
    for rank in range(len(cells)):
        if len(chunks_on(placement, rank)) * len(cells) != len(placement):
            raise ScheduleError(f"--schedule {path}: row {rank} runs chunks {chunks_on(placement, rank)} of "
                                f"{len(placement)}; every row must run the same number of chunks")
    return placement


def file_virtual_stages(path) -> int:
    """V of a schedule file (the model chunks per row), with its placement checked."""
    cells = _cells(path)
    return len(_placement(path, cells)) // len(cells)


def read_csv(path, n_stages: int, n_microbatches: int) -> tuple[dict[int, list[Action]], tuple[int, ...]]:
    """({rank: its training actions}, placement) from a compute-only CSV file; ScheduleError names
    the row and cell that cannot be a minipipe action, or the chunk that is placed wrongly.
    Soundness is check.simulate's to prove."""
    cells = _cells(path)
    if len(cells) != n_stages:
        raise ScheduleError(f"--schedule {path}: {len(cells)} rows, one per rank is needed for {n_stages} stages")
    placement = _placement(path, cells)
    lists = {rank: with_messages([(kind, chunks_on(placement, rank).index(chunk), m) for kind, chunk, m in row],
                                 rank, placement) + [Action(Kind.ALLREDUCE), Action(Kind.STEP)]
             for rank, row in enumerate(cells)}
    return lists, placement
