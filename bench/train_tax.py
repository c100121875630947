"""What train.py costs over the engine it drives, and over a plain torch script, end to end.

    python bench/train_tax.py                                   # gpipe and zb-h1, 3 rounds: ~6 min, 2 cores
    python bench/train_tax.py --schedule gpipe --rounds 1 --steps 10       # a quick look
    python bench/train_tax.py --profile                         # where train.py's loop spends its time

Three contenders per schedule, each a torchrun job of K processes (one thread each), run in turn,
--rounds times (train.py, engine, torch, train.py, ...), on the same model (GPT shape, the same cut
by parameter count, each layer from (seed, layer)) and the same batches (minipipe's data cursor):
    train.py  train.train() exactly as `torchrun train.py FLAGS` runs it (its default metrics:
              console, wandb --wandb, validation at the last step), its logger wrapped to note
              the time of each step's record;
    engine    build_run, then a bare loop: cursor.next_batch -> engine.train_step (lr_at, clip 1.0);
    torch     the schedule's torch namesake in a plain loop (bench/pipeline.py's torch contender):
              ScheduleX.step, global-norm clip at 1.0 (one all-reduce), AdamW, the same lr schedule.
Steady state: the time between consecutive step ends on rank 0 (so everything in the loop
counts: data, step, metrics, logging), the first --warmup steps and the last (train.py validates
there) left out; per job the median, then median (min-max) over rounds, and ratios taken within
a round (its jobs ran back to back).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/pipeline.py's torch contender
from pipeline import NAMESAKES, REPO_ROOT, torch_contender  # noqa: E402

CONTENDERS = ("train.py", "engine", "torch")


def _train_flags(args, schedule: str, out_dir: str) -> list[str]:
    v = 2 if schedule in ("interleaved", "zbv", "dualpipev") else 1
    return ["--model", "transformer", "--layers", str(args.layers), "--d-model", str(args.d_model),
            "--heads", str(args.heads), "--max-seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--stages", str(args.stages), "--microbatches", str(args.microbatches), "--schedule", schedule,
            "--virtual-stages", str(v), "--recompute", args.recompute, "--steps", str(args.steps),
            "--data", "stdlib", "--device", "cpu",
            "--wandb", args.wandb, "--out-dir", out_dir, *args.train_args.split()]


class StampedLogger:
    """train.py's own logger, noting when each step's record was handed over; with a profiler,
    profiling the steps after the warm-up up to the last (which validates)."""

    def __init__(self, inner, profiler=None, warmup: int = 0, steps: int = 0):
        self.inner, self.stamps, self.profiler, self.profiled = inner, [], profiler, (warmup, steps - 1)

    def config(self, values):
        self.inner.config(values)

    def log(self, step, values):
        self.inner.log(step, values)
        if "loss" in values:
            self.stamps.append(time.perf_counter())
            if self.profiler and len(self.stamps) in self.profiled:
                (self.profiler.enable if len(self.stamps) == self.profiled[0] else self.profiler.disable)()

    def close(self):
        self.inner.close()


def _run_train(cfg, warmup: int) -> list[float]:
    import cProfile
    import pstats

    import train
    from minipipe.tracking.metrics import make_logger
    profile = cProfile.Profile() if os.environ.get("TAX_PROFILE") and os.environ["RANK"] == "0" else None
    logger = StampedLogger(make_logger(cfg, int(os.environ["RANK"])), profile, warmup, cfg.steps)
    train.train(cfg, logger)
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        pstats.Stats(profile).sort_stats("cumtime").print_stats(40)
        pstats.Stats(profile).sort_stats("cumtime").print_stats("train.py|metrics.py|wandb_run.py", 12)
    return logger.stamps


def _run_engine(cfg) -> list[float]:
    from minipipe.build import build_run
    from minipipe.data import DataCursor
    from minipipe.pipeline.optim import lr_at
    run = build_run(cfg)
    cursor, stamps = DataCursor(run.dataset, cfg.batch_size), []
    for step in range(cfg.steps):
        run.engine.train_step(*cursor.next_batch(), step, lr_at(step, cfg), cfg.grad_clip)
        stamps.append(time.perf_counter())
    return stamps


def _run_torch(cfg, schedule: str, args) -> list[float]:
    from minipipe.data import DataCursor, load_settled
    from minipipe.dist import init_process_groups
    from minipipe.pipeline.optim import lr_at
    cfg, dataset = load_settled(cfg)
    layout = init_process_groups(cfg.stages, 1, cfg.timeout, "cpu")
    args.recompute, args.virtual_stages = cfg.recompute, cfg.virtual_stages if cfg.virtual_stages > 1 else 2
    step_fn, _, _ = torch_contender(NAMESAKES[schedule], cfg, layout, cfg.microbatches, args, cfg.grad_clip)
    cursor, stamps = DataCursor(dataset, cfg.batch_size), []
    for step in range(cfg.steps):
        step_fn(*cursor.next_batch(), lr=lr_at(step, cfg))
        stamps.append(time.perf_counter())
    return stamps


def worker(args) -> None:
    import torch.distributed as dist

    from minipipe.command_line import parse_config
    cfg = parse_config(_train_flags(args, args.schedule, args.out_dir))
    if args.worker == "train.py":
        stamps = _run_train(cfg, args.warmup)
    elif args.worker == "engine":
        stamps = _run_engine(cfg)
    else:
        stamps = _run_torch(cfg, args.schedule, args)
    if int(os.environ["RANK"]) == 0:
        with open(args.result, "w") as fh:
            json.dump([b - a for a, b in zip(stamps, stamps[1:])], fh)
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(contender: str, schedule: str, args, profile: bool = False) -> list[float]:
    """Step-to-step times of one job (rank 0), steady state only."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        flags = [f"--worker={contender}", "--worker-result", result, "--worker-out", tmp, "--schedule", schedule]
        for name in ("warmup", "layers", "d_model", "heads", "seq_len", "batch_size", "stages", "microbatches", "steps",
                     "recompute", "wandb", "train_args"):
            flags.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.stages}",
               os.path.abspath(__file__), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"TAX_PROFILE": "1"} if profile else {})}
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{contender} {schedule} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        if profile:
            print(done.stdout[-12000:])
        with open(result) as fh:
            intervals = json.load(fh)
    return intervals[args.warmup:-1]  # the last step of train.py validates


def _spread(values: list[float], fmt: str) -> str:
    text = format(statistics.median(values), fmt)
    return text + (f" ({format(min(values), fmt)}-{format(max(values), fmt)})" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="gpipe,zb-h1", help="comma-separated minipipe schedules")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16,
                        help="steps per job (the first --warmup and the last not timed)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="times each contender runs, in turn")
    parser.add_argument("--recompute", default="never", choices=("always", "except_last", "never"),
                        help="for all three (train.py's default is always; the torch script checkpoints each chunk)")
    parser.add_argument("--wandb", default="auto", help="train.py's --wandb (auto: its default)")
    parser.add_argument("--train-args", default="", help="more train.py flags (quoted)")
    parser.add_argument("--profile", action="store_true", help="cProfile train.py's rank 0, print the top")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", dest="result", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", dest="out_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    tokens = args.batch_size * args.seq_len
    if args.profile:
        for schedule in args.schedule.split(","):
            launch("train.py", schedule, args, profile=True)
        return
    lines = [f"Transformer L={args.layers} d={args.d_model} T={args.seq_len} B={args.batch_size}, K={args.stages}, "
             f"M={args.microbatches}, recompute={args.recompute}, one thread per process, {args.steps} steps per "
             f"job ({args.warmup} warm-up and the last not timed), {args.rounds} round(s): median (min-max); "
             f"train.py --wandb {args.wandb}\n",
             "| schedule | train.py tok/s | engine tok/s | torch tok/s | train.py / engine | train.py / torch "
             "| engine / torch |", "|---|---|---|---|---|---|---|"]
    for schedule in args.schedule.split(","):
        rates = {name: [] for name in CONTENDERS}
        for _ in range(args.rounds):
            for name in CONTENDERS:
                rates[name].append(tokens / statistics.median(launch(name, schedule, args)))

        def ratio(a, b):
            return _spread([x / y for x, y in zip(rates[a], rates[b])], ".3f")
        cells = [_spread(rates[name], ",.0f") for name in CONTENDERS]
        cells += [ratio("train.py", "engine"), ratio("train.py", "torch"), ratio("engine", "torch")]
        lines.append(f"| {schedule} ({NAMESAKES[schedule]}) | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
