"""Each minipipe schedule beside its torch.distributed.pipelining namesake, measured side by side.

    python bench/pipeline.py                                   # K in {1, 2}, M in {4, 8, 16}
    python bench/pipeline.py --stages 2 --microbatches 8 --layers 8 --d-model 256 --seq-len 128
    python bench/pipeline.py --schedule 1f1b,interleaved --virtual-stages 2

minipipe gpipe | 1f1b | interleaved (V chunks per rank) | zb-h1 against ScheduleGPipe | Schedule1F1B |
ScheduleInterleaved1F1B | ScheduleInterleavedZeroBubble (here with one stage per rank). Each (K, M) is one torchrun job of K processes (one thread each on CPU).
Every rank builds minipipe's stage for each schedule, and the torch schedule runs deep copies of
the very same chunk modules (same weights, same batches) with AdamW; all contenders run step i
back to back before any runs step i+1, so a change in machine load hits all alike. With
--recompute always the torch stages are wrapped in torch.utils.checkpoint.

Reported per contender: tokens/s of the median step; for minipipe the measured bubble (the idle
share of each rank's step, 1 - busy compute / step, averaged over ranks) beside the schedule's
theoretical one; and the peak bytes each stage holds for backward during a step (saved tensors
of autograd, each storage once, parameters excluded; counted by saved_tensors_hooks in one extra
untimed step; stage inputs stashed by re-materialisation are not autograd tensors, so compare
this column with --recompute never, the default).
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
import weakref

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

COMPUTE = {"forward", "backward", "backward_input", "backward_weight"}
# zb-h1 runs beside torch's Schedule1F1B: torch's split-backward schedules (InterleavedZeroBubble,
# ZBVZeroBubble, DualPipeV) fail on these chunks in torch 2.13, stage_backward_weight raising a
# KeyError on the weight Parameter that minipipe's training Head hands to the loss
TORCH_NAMES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B",
               "zb-h1": "Schedule1F1B"}
MULTI_STAGE = {"interleaved"}  # torch classes that take a list of this rank's stages


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


def _peak_saved_bytes(step, params) -> int:
    """Peak live bytes autograd saves for backward during step() (parameters excluded)."""
    import torch
    excluded = {p.untyped_storage().data_ptr() for p in params}
    refs, live, peak = {}, [0], [0]

    class Holder:
        def __init__(self, tensor):
            self.tensor = tensor

    def release(ptr, size):
        refs[ptr] -= 1
        if not refs[ptr]:
            live[0] -= size

    def pack(tensor):
        # detached: a saved output held with its grad_fn would keep a retained graph (zb-h1's I
        # to W) alive through a cycle autograd cannot see; the storage is the same
        holder, ptr = Holder(tensor.detach()), tensor.untyped_storage().data_ptr()
        if ptr not in excluded:
            size = tensor.untyped_storage().nbytes()
            if not refs.get(ptr):
                live[0] += size
                peak[0] = max(peak[0], live[0])
            refs[ptr] = refs.get(ptr, 0) + 1
            weakref.finalize(holder, release, ptr, size)
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
        step()
    return peak[0]


def _torch_schedule(run, schedule: str, m: int, recompute: str):
    """torch's namesake on deep copies of this rank's minipipe chunks; returns (step_fn, params)."""
    import torch
    from torch.distributed import pipelining
    from torch.utils.checkpoint import checkpoint

    from minipipe.models import registry
    class Chunk(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = torch.nn.Sequential(*layers)

        def forward(self, value):
            if recompute != "never":
                return checkpoint(self.layers, value, use_reentrant=False)
            return self.layers(value)

    lay = run.layout
    chunks = [Chunk([copy.deepcopy(run.stage.layers[str(i)]) for i in c]) for c in run.stage.chunks]
    stages = [pipelining.PipelineStage(chunk, c, run.spec.n_chunks, lay.device)  # torch's stage: the model chunk
              for c, chunk in zip(run.spec.chunks_on(lay.stage), chunks)]

    loss_sum = registry.loss_fn(run.cfg, run.backend)  # minipipe's own loss: like for like

    def loss_fn(output, y):  # a training Head hands over (hidden, weight): the fused head's loss
        return loss_sum(output, y) / y.numel()

    cls = getattr(pipelining, TORCH_NAMES[schedule])
    sched = cls(stages if schedule in MULTI_STAGE else stages[0], m, loss_fn=loss_fn)
    params = [p for chunk in chunks for p in chunk.parameters()]
    optimizer = torch.optim.AdamW(params, lr=run.cfg.lr)
    last = run.spec.placement[-1] == lay.stage

    def step(inputs, targets):
        sched.step(*((inputs,) if run.spec.placement[0] == lay.stage else ()), target=targets if last else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, params


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from minipipe.build import build_run
    from minipipe.config import make_config
    from minipipe.errors import ConfigError
    from minipipe.schedule.actions import check_schedule
    from minipipe.schedule.check import theory_bubble

    model = dict(model="transformer", layers=args.layers, d_model=args.d_model, heads=args.heads,
                 max_seq_len=args.seq_len, data="stdlib", batch_size=args.batch_size, grad_clip=0.0,
                 eval_every=0)
    contenders = []  # (name, step(i))
    runs = {}
    for schedule in args.schedules:
        v = args.virtual_stages if schedule == "interleaved" else 1
        try:  # e.g. interleaved with M not a multiple of K: that row stays empty
            check_schedule(schedule, int(os.environ["WORLD_SIZE"]), args.m, v)
        except ConfigError:
            continue
        cfg = make_config(**model, microbatches=args.m, recompute=args.recompute, schedule=schedule,
                          virtual_stages=v)
        run = build_run(cfg)
        try:  # torch refuses some that minipipe runs (Schedule1F1B: M >= K): no row either
            torch_step, _ = _torch_schedule(run, schedule, args.m, args.recompute)
        except ValueError:
            continue
        run.engine.timed = True  # CUDA: every step's spans from device events (the bubble column)
        runs[schedule] = run
        batches = [run.dataset.batch(i, cfg.batch_size) for i in range(args.warmup + args.steps + 1)]
        contenders.append((f"minipipe {schedule}", lambda i, r=run, b=batches:
                           r.engine.train_step(*b[i], i, r.cfg.lr, r.cfg.grad_clip)))
        contenders.append((TORCH_NAMES[schedule], lambda i, s=torch_step, b=batches: s(*b[i])))
    times = _time_interleaved([fn for _, fn in contenders], args.warmup, args.steps)
    result = {"tok_per_step": args.batch_size * args.seq_len, "rows": {}}
    for (name, _), kept in zip(contenders, times):
        result["rows"][name] = {"step_s": statistics.median(kept)}
    n = args.warmup + args.steps
    for schedule, run in runs.items():
        engine = run.engine
        busy = sum(end - start for kind, _, _, start, end in engine.spans if kind in COMPUTE)
        wall = engine.spans[-1][4] - engine.spans[0][3]
        ours_mem = _peak_saved_bytes(lambda: engine.train_step(*run.dataset.batch(n, args.batch_size), n,
                                                               run.cfg.lr, 0.0), run.stage.parameters())
        step, params = _torch_schedule(run, schedule, args.m, args.recompute)
        theirs_mem = _peak_saved_bytes(lambda: step(*run.dataset.batch(n, args.batch_size)), params)
        local = torch.tensor([1.0 - busy / wall, ours_mem, theirs_mem], dtype=torch.float64)
        rows = [local]
        if run.layout.world_size > 1:
            rows = [torch.empty_like(local) for _ in range(run.layout.world_size)]
            dist.all_gather(rows, local)
        ours, theirs = result["rows"][f"minipipe {schedule}"], result["rows"][TORCH_NAMES[schedule]]
        ours["bubble"] = sum(float(r[0]) for r in rows) / len(rows)
        ours["bubble_theory"] = theory_bubble(schedule, run.layout.n_stages, args.m, run.cfg.virtual_stages)
        ours["peak_mib"] = [float(r[1]) / 2**20 for r in rows]
        theirs["peak_mib"] = [float(r[2]) / 2**20 for r in rows]
    if dist.get_rank() == 0:
        with open(args.result, "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


def launch(k: int, m: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        flags = ["--worker", "--worker-microbatches", str(m), "--worker-result", result]
        for name in ("schedule", "virtual_stages", "recompute", "warmup", "steps", "layers", "d_model",
                     "heads", "seq_len", "batch_size"):
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}",
               __file__, *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"K={k} M={m} failed:\n{done.stderr[-3000:]}")
        with open(result) as fh:
            return json.load(fh)


def _table(results: dict, args) -> str:
    lines = [f"Transformer L={args.layers} d={args.d_model} T={args.seq_len} B={args.batch_size}, "
             f"recompute={args.recompute}, V={args.virtual_stages} for interleaved, {args.threads} "
             f"thread(s) per process, median of {args.steps} steps\n",
             "| K | M | schedule | minipipe tok/s | torch tok/s | minipipe / torch | bubble measured "
             "| bubble theory | peak saved MiB per stage (minipipe / torch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (k, m), result in results.items():
        rows, tokens = result["rows"], result["tok_per_step"]
        ran = [s for s in args.schedules if f"minipipe {s}" in rows]
        for schedule in ran:
            ours, theirs = rows[f"minipipe {schedule}"], rows[TORCH_NAMES[schedule]]
            memory = ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(ours["peak_mib"], theirs["peak_mib"]))
            lines.append(f"| {k} | {m} | {schedule} | {tokens / ours['step_s']:,.0f} | "
                         f"{tokens / theirs['step_s']:,.0f} | {theirs['step_s'] / ours['step_s']:.2f} | "
                         f"{ours['bubble']:.2f} | {ours['bubble_theory']:.2f} | {memory} |")
        fastest_ours = min(rows[f"minipipe {s}"]["step_s"] for s in ran)
        fastest_theirs = min(rows[TORCH_NAMES[s]]["step_s"] for s in ran)
        lines.append(f"| {k} | {m} | fastest | {tokens / fastest_ours:,.0f} | {tokens / fastest_theirs:,.0f} "
                     f"| {fastest_theirs / fastest_ours:.2f} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--microbatches", default="4,8,16")
    parser.add_argument("--schedule", default="gpipe,1f1b,interleaved", help="comma-separated schedules")
    parser.add_argument("--virtual-stages", type=int, default=2, help="chunks per rank for interleaved")
    parser.add_argument("--recompute", default="never", choices=("always", "except_last", "never"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-microbatches", dest="m", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", dest="result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.schedules = args.schedule.split(",")
    if args.worker:
        return worker(args)
    results = {(k, m): launch(k, m, args) for k in map(int, args.stages.split(","))
               for m in map(int, args.microbatches.split(","))}
    print(_table(results, args))


if __name__ == "__main__":
    main()
