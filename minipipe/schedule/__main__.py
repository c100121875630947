"""`python -m minipipe.schedule`: print a schedule as a rank x time grid (the checker's simulation)."""
import argparse
import sys

from minipipe.schedule.actions import SCHEDULES, ScheduleError
from minipipe.schedule.check import render_grid


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minipipe.schedule",
                                     description="Print a pipeline schedule as a rank x time grid.")
    parser.add_argument("--schedule", default="gpipe", choices=SCHEDULES)
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages K")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches M")
    parser.add_argument("--virtual-stages", type=int, default=1, help="chunks per stage V (interleaved)")
    args = parser.parse_args(argv)
    try:
        print(render_grid(args.schedule, args.stages, args.microbatches, args.virtual_stages))
    except ScheduleError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
