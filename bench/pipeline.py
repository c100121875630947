"""Pipeline throughput vs K and M (the shape of GPipe's Table 2), and minipipe vs
torch.distributed.pipelining.ScheduleGPipe on the same stages, measured side by side in one run.

    python bench/pipeline.py                       # K in {1, 2}, M in {1, 2, 4, 8}, CPU gloo
    python bench/pipeline.py --stages 1,2,4 --microbatches 4,8 --recompute always

Each (K, M) launches one torchrun job of K processes (one thread each on CPU). Inside it, every
rank builds its stage once and times minipipe's train_step and ScheduleGPipe.step + AdamW on a
fresh copy of the same stage (same weights, same batches), alternating step by step; with
--recompute always/except_last the torch stage is wrapped in torch.utils.checkpoint. Throughput is tokens/s of the median
step; the measured bubble is the idle share of a stage's step (1 - busy compute / step time),
averaged over stages, beside the theoretical (K-1)/(M+K-1). Prints a markdown table.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

MODEL = dict(model="transformer", layers=8, d_model=128, heads=4, max_seq_len=64, data="stdlib",
             batch_size=32, grad_clip=0.0, eval_every=0)
COMPUTE = {"forward", "backward"}


def _time_interleaved(step_fns, n_warmup: int, n_steps: int) -> list[list[float]]:
    """Step i of every contender back to back, so a change in machine load hits all alike."""
    times = [[] for _ in step_fns]
    for i in range(n_warmup + n_steps):
        for fn, kept in zip(step_fns, times):
            started = time.perf_counter()
            fn(i)
            if i >= n_warmup:
                kept.append(time.perf_counter() - started)
    return times


def _recomputed_module():
    import torch
    from torch.utils.checkpoint import checkpoint

    class Recomputed(torch.nn.Module):
        """torch.utils.checkpoint around a whole stage: keep its input, recompute in backward."""
        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, value):
            return checkpoint(self.stage, value, use_reentrant=False)
    return Recomputed


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from minipipe.build import build_run
    from minipipe.config import make_config

    cfg = make_config(**MODEL, microbatches=args.m, recompute=args.recompute)
    run = build_run(cfg)
    lay, engine = run.layout, run.engine
    reference_stage = copy.deepcopy(run.stage)  # the same weights for the torch schedule
    Recomputed = _recomputed_module()
    batches = [run.dataset.batch(i, cfg.batch_size) for i in range(args.warmup + args.steps)]

    def minipipe_step(i):
        engine.train_step(*batches[i], i, cfg.lr, cfg.grad_clip)

    if args.recompute != "never":  # the same re-materialisation for the torch schedule
        reference_stage = Recomputed(reference_stage)
    stage = PipelineStage(reference_stage, lay.stage, lay.n_stages, lay.device)
    schedule = ScheduleGPipe(stage, args.m, loss_fn=lambda logits, y: F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    optimizer = torch.optim.AdamW(reference_stage.parameters(), lr=cfg.lr)

    def torch_step(i):
        inputs, targets = batches[i]
        step_args = (inputs,) if lay.is_first else ()
        schedule.step(*step_args, target=targets if lay.is_last else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ours, theirs = _time_interleaved([minipipe_step, torch_step], args.warmup, args.steps)
    busy = sum(end - start for kind, _, start, end in engine.spans if kind in COMPUTE)
    wall = engine.spans[-1][3] - engine.spans[0][2]
    bubble = torch.tensor([1.0 - busy / wall])
    if lay.world_size > 1:
        dist.all_reduce(bubble)
    if lay.rank == 0:
        with open(args.result, "w") as fh:
            json.dump({"ours": statistics.median(ours), "theirs": statistics.median(theirs),
                       "bubble": float(bubble) / lay.world_size}, fh)
    dist.destroy_process_group()


def launch(k: int, m: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}",
               __file__, "--worker", "--worker-microbatches", str(m), "--recompute", args.recompute,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--worker-result", result]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"K={k} M={m} failed:\n{done.stderr[-3000:]}")
        with open(result) as fh:
            return json.load(fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--microbatches", default="1,2,4,8")
    parser.add_argument("--recompute", default="never", choices=("always", "except_last", "never"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-microbatches", dest="m", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", dest="result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    tokens = MODEL["batch_size"] * MODEL["max_seq_len"]
    stages = [int(k) for k in args.stages.split(",")]
    micro = [int(m) for m in args.microbatches.split(",")]
    results = {(k, m): launch(k, m, args) for k in stages for m in micro}
    print(f"Transformer L={MODEL['layers']} d={MODEL['d_model']} T={MODEL['max_seq_len']} "
          f"B={MODEL['batch_size']}, recompute={args.recompute}, {args.threads} thread(s) per process, "
          f"median of {args.steps} steps\n")
    print("| K | M | minipipe tok/s | normalised to K=1 | bubble measured | bubble (K-1)/(M+K-1) "
          "| ScheduleGPipe tok/s | minipipe / ScheduleGPipe |")
    print("|---|---|---|---|---|---|---|---|")
    for (k, m), r in results.items():
        base = results.get((stages[0], m), r)
        print(f"| {k} | {m} | {tokens / r['ours']:,.0f} | {base['ours'] / r['ours']:.2f} | "
              f"{r['bubble']:.2f} | {(k - 1) / (m + k - 1):.2f} | {tokens / r['theirs']:,.0f} | "
              f"{r['theirs'] / r['ours']:.2f} |")


if __name__ == "__main__":
    main()
