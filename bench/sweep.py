"""Sweep K, M, re-materialisation and model size with real torchrun runs, as one wandb group, and
print GPipe's Table 2: training throughput normalised to K=1.

    python bench/sweep.py                      # the tiny default grid: 4 runs, ~30 s on 2 CPU cores
    python bench/sweep.py --stages 1,2,4,8 --microbatches 1,4,32 --recompute always,never \\
        --depth 8,16 --steps 30 --batch-size 64 --train-args "--preset small"

Each run is `torchrun --nproc_per_node=K train.py ...` with its own JSONL; its throughput is the
median over the steps after the first (warm-up). A table per model size and recompute mode: rows
K, columns M; each cell is throughput / throughput of the K=1 run with the grid's smallest M (one
baseline per table, as the paper normalises to one configuration). `--depth` is Transformer
blocks (--layers) or AmoebaNet cells (--cells).
"""
import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="transformer", choices=("transformer", "amoebanet"))
    parser.add_argument("--stages", type=_ints, default=[1, 2], help="K values, e.g. 1,2,4")
    parser.add_argument("--microbatches", type=_ints, default=[1, 4], help="M values, e.g. 1,4,32")
    parser.add_argument("--recompute", type=lambda t: t.split(","), default=["always"],
                        help="re-materialisation modes, e.g. always,never")
    parser.add_argument("--depth", type=_ints, default=[4], help="Transformer blocks or AmoebaNet cells")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-args", default="--d-model 64 --heads 2 --seq-len 64",
                        help="more train.py flags for every run (quoted)")
    parser.add_argument("--group", default=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", help="wandb group")
    parser.add_argument("--wandb", default="auto", choices=("auto", "online", "offline", "disabled"))
    parser.add_argument("--out-dir", default="out/sweep")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    return parser.parse_args(argv)


def run_one(args, k: int, m: int, recompute: str, depth: int) -> float | None:
    """Median throughput (tokens or samples per second) of one torchrun run; None if it failed."""
    name = f"{args.model}-d{depth}-{recompute}-K{k}-M{m}"
    out = Path(args.out_dir) / args.group
    jsonl = out / f"{name}.jsonl"
    jsonl.unlink(missing_ok=True)
    depth_flag = "--layers" if args.model == "transformer" else "--cells"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}",
           str(REPO_ROOT / "train.py"), "--model", args.model, depth_flag, str(depth),
           "--stages", str(k), "--microbatches", str(m), "--recompute", recompute,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", "0",
           "--eval-batches", "1", "--log-every", str(args.steps), "--metrics-jsonl", str(jsonl),
           "--wandb", args.wandb, "--wandb-group", args.group, "--run-name", name,
           "--out-dir", str(out), *shlex.split(args.train_args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: timed out after {args.timeout} s", file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"{name}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rates = [row.get("tokens_per_s", row.get("samples_per_s")) for row in rows if "loss" in row]
    return statistics.median(rates[1:] or rates)


def format_tables(args, results: dict) -> str:
    lines = []
    k_base, m_base = min(args.stages), min(args.microbatches)
    for depth, recompute in itertools.product(args.depth, args.recompute):
        base = results.get((depth, recompute, k_base, m_base))
        unit = "tok/s" if args.model == "transformer" else "samples/s"
        lines.append(f"\n{args.model} depth {depth}, recompute {recompute}: throughput / "
                     f"throughput at K={k_base}, M={m_base}"
                     + (f" ({base:,.0f} {unit})" if base else " (baseline run failed)"))
        header = ["K"] + [f"M={m}" for m in args.microbatches]
        rows = [header]
        for k in args.stages:
            cells = [results.get((depth, recompute, k, m)) for m in args.microbatches]
            rows.append([str(k)] + ["failed" if c is None else f"{c / base:.2f}" if base else
                                    f"{c:,.0f}" for c in cells])
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    grid = list(itertools.product(args.depth, args.recompute, args.stages, args.microbatches))
    for i, (depth, recompute, k, m) in enumerate(grid, 1):
        started = time.perf_counter()
        results[depth, recompute, k, m] = run_one(args, k, m, recompute, depth)
        rate = results[depth, recompute, k, m]
        print(f"[{i}/{len(grid)}] depth {depth} {recompute} K={k} M={m}: "
              f"{'failed' if rate is None else f'{rate:,.0f}/s'} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    print(f"wandb group: {args.group}" + format_tables(args, results))
    return 0 if all(r is not None for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
