"""`python -m minipipe.schedule`: print a schedule as a rank x time grid (the checker's simulation)."""
import argparse
import sys

from minipipe.schedule.actions import SCHEDULES, ScheduleError, implied_virtual_stages
from minipipe.schedule.check import render_grid, schedule_lists
from minipipe.schedule.csv_format import csv_rows, write_csv


def _schedule(text: str) -> str:
    if text in SCHEDULES or text.endswith(".csv"):
        return text
    raise argparse.ArgumentTypeError(f"choose one of {', '.join(SCHEDULES)}, or a .csv file of actions")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minipipe.schedule",
                                     description="Print a pipeline schedule as a rank x time grid.")
    parser.add_argument("--schedule", default="gpipe", type=_schedule,
                        help=f"{', '.join(SCHEDULES)}, or a CSV file in torch.distributed.pipelining's "
                             "compute-only form (one row per rank: 0F0,0I0,0W0,...), checked before it is shown")
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages K")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches M")
    parser.add_argument("--virtual-stages", type=int, default=None,
                        help="chunks per stage V (interleaved: give it; zbv, dualpipev: 2, implied; else 1)")
    parser.add_argument("--csv", metavar="PATH", help="also write the schedule's compute actions as that CSV file")
    args = parser.parse_args(argv)
    try:
        v = implied_virtual_stages(args.schedule) if args.virtual_stages is None else args.virtual_stages
        print(render_grid(args.schedule, args.stages, args.microbatches, v))
        if args.csv:
            lists, placement = schedule_lists(args.schedule, args.stages, args.microbatches, v)
            write_csv(args.csv, csv_rows(lists, placement))
            print(f"wrote {args.csv}")
    except ScheduleError as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(f"--csv {args.csv}: cannot write it: {err.strerror or err}")


if __name__ == "__main__":
    main(sys.argv[1:])
