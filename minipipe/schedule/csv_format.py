"""PURE: schedules as files, in torch.distributed.pipelining's compute-only CSV form.

One row per rank, one cell per compute action `[stage][type][micro-batch]`: `2F0` is the forward
of micro-batch 0 on model chunk (torch: stage) 2, `2B0` its fused backward, `2I0` / `2W0` the
input- and weight-gradient halves of a split one. Messages are not written: they follow from the
compute order exactly as for the named schedules (actions.with_messages). Chunk c runs on rank
c mod K as the rank's local chunk c // K (one chunk per rank when the file names K chunks; the
interleaved placement when it names V*K).

    write_csv(path, csv_rows(lists))   # {rank: actions} (check.schedule_lists) as a file
    lists, v = read_csv(path, K, M)    # every rank's list back; check.simulate proves it

torch's `_PipelineScheduleRuntime._load_csv` / `_dump_csv` read and write the same files.
"""
import csv
import re
from pathlib import Path

from minipipe.schedule.actions import Action, Kind, ScheduleError, with_messages

_CELL = re.compile(r"(\d+)([FBIW])(\d+)")
_KINDS = {"F": Kind.FORWARD, "B": Kind.BACKWARD, "I": Kind.BACKWARD_INPUT, "W": Kind.BACKWARD_WEIGHT}
_LETTERS = {kind: letter for letter, kind in _KINDS.items()}


def csv_rows(lists: dict[int, list[Action]]) -> list[list[str]]:
    """Each rank's compute actions ({rank: actions}, as check.schedule_lists gives), as CSV cells."""
    k = len(lists)
    return [[f"{a.chunk * k + rank}{_LETTERS[a.kind]}{a.microbatch}" for a in lists[rank] if a.kind in _LETTERS]
            for rank in range(k)]


def write_csv(path, rows: list[list[str]]) -> None:
    """Writes the file, making its folder as other outputs do (--trace, --metrics-jsonl)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def read_csv(path, n_stages: int, n_microbatches: int) -> tuple[dict[int, list[Action]], int]:
    """({rank: its training actions}, V) from a compute-only CSV file; ScheduleError names the
    row and cell that cannot be a minipipe action. Soundness is check.simulate's to prove."""
    k = n_stages
    try:
        with open(path, newline="") as f:
            rows = [[cell.strip() for cell in row if cell.strip()] for row in csv.reader(f)]
    except OSError as err:
        raise ScheduleError(f"--schedule {path}: cannot read the schedule file: {err.strerror}") from err
    if len(rows) != k:
        raise ScheduleError(f"--schedule {path}: {len(rows)} rows, one per rank is needed for {k} stages")
    parsed = []
    for rank, row in enumerate(rows):
        for cell in row:
            match = _CELL.fullmatch(cell)
            if match is None:
                raise ScheduleError(f"--schedule {path}: row {rank} cell {cell!r} is not a compute action "
                                    "[chunk][F|B|I|W][micro-batch] (messages are derived, do not list them)")
            chunk, letter, m = int(match[1]), match[2], int(match[3])
            if chunk % k != rank:
                raise ScheduleError(f"--schedule {path}: row {rank} cell {cell!r}: chunk {chunk} runs on "
                                    f"rank {chunk % k} (chunk c on rank c mod K)")
            parsed.append((rank, _KINDS[letter], chunk, m))
    v = max((chunk for _, _, chunk, _ in parsed), default=0) // k + 1
    lists = {rank: with_messages([(kind, chunk // k, m) for r, kind, chunk, m in parsed if r == rank],
                                 rank, k, v) + [Action(Kind.ALLREDUCE), Action(Kind.STEP)]
             for rank in range(k)}
    return lists, v
