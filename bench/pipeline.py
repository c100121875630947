"""Every minipipe schedule beside all seven torch.distributed.pipelining schedules, side by side.

    python bench/pipeline.py                                  # K in {1, 2}, M in {4, 8, 16}: ~15 min, 2 cores
    python bench/pipeline.py --stages 1,2 --microbatches 8 --repeats 3    # the headline row, 3 times
    python bench/pipeline.py --schedule gpipe,ScheduleGPipe --microbatches 8 --steps 3    # a quick look

Contenders: minipipe's schedules (whatever minipipe.schedule.actions.SCHEDULES holds: gpipe, 1f1b,
interleaved, zb-h1, zbv, dualpipev) and torch's seven: ScheduleGPipe,
Schedule1F1B, ScheduleInterleaved1F1B and ScheduleLoopedBFS (V chunks per rank, looped: chunk c on
rank c mod K), ScheduleInterleavedZeroBubble (one stage per rank: ZB-H1's shape), ScheduleZBVZeroBubble
and ScheduleDualPipeV (two chunks per rank in a V: rank r holds chunks r and 2K-1-r, torch's
generate_rank_to_stage_mapping(style="v")). Namesakes: gpipe, 1f1b, interleaved, zb-h1 ->
InterleavedZeroBubble, zbv -> ZBVZeroBubble, dualpipev -> DualPipeV.

Each (K, M) is one torchrun job of K processes (one thread each on CPU). Every contender runs the
same model cut the same way (layers by parameter count into K*V chunks, each layer built from
(seed, layer) only, so the weights are bitwise equal), on the same batches, with AdamW; step i of
every contender runs before any runs step i+1, so a change in machine load hits all alike.
--recompute always wraps each torch chunk in torch.utils.checkpoint. No clipping (grad_clip 0):
minipipe's step still has its one gradient-norm all-reduce (it also carries the loss), torch's none.

torch's last chunk is not minipipe's: minipipe's training Head hands (hidden, weight) to a fused
linear + cross-entropy loss, and torch 2.13's split backward (stage_backward_weight) raises KeyError
on that weight's AccumulateGrad when a Parameter is a stage output. So torch's last chunk applies
the linear itself (F.linear(hidden, weight): the Head's eval-mode logits) and its loss is
minipipe's cross-entropy of those logits. Same ops on CPU (--kernels torch: the fused loss is
F.linear + F.cross_entropy there); what differs is where the linear sits (in the chunk, so torch's
stage output is the (rows, T, vocab) logits) and on a GPU the Triton path, which never makes the
whole logits. The "heads alone" line times the two forms at one micro-batch to show the difference.

Reported per contender and (K, M): tokens/s (median step of each repeat; median and min-max over
--repeats), pipeline efficiency (tokens/s at K over K x the same contender's tokens/s at K=1 and
the same M in this invocation; * where that contender cannot run at K=1: then against minipipe
gpipe's K=1 figure), the ratio to its torch namesake and to torch's fastest (per repeat, then the
median); for minipipe also the measured bubble (idle share of each rank's last timed step, 1 -
busy compute / step, averaged over ranks) beside the schedule's theoretical one; and the peak bytes
each stage holds for backward (saved tensors of autograd, each storage once, parameters excluded,
counted in each contender's first step, untimed; stage inputs stashed for re-materialisation are
not autograd tensors, so compare this column under --recompute never, the default).
"""
import argparse
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
# torch class -> (its chunks per rank: None = --virtual-stages, placement style)
TORCH_SCHEDULES = {"ScheduleGPipe": (1, "loop"), "Schedule1F1B": (1, "loop"),
                   "ScheduleInterleaved1F1B": (None, "loop"), "ScheduleLoopedBFS": (None, "loop"),
                   "ScheduleInterleavedZeroBubble": (1, "loop"), "ScheduleZBVZeroBubble": (2, "v"),
                   "ScheduleDualPipeV": (2, "v")}
SINGLE_STAGE = {"ScheduleGPipe", "Schedule1F1B"}  # the classes that take one stage, not a list
NAMESAKES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B",
             "zb-h1": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble",
             "dualpipev": "ScheduleDualPipeV"}
V_PLACED = {"zbv", "dualpipev"}  # minipipe schedules that run two chunks per rank in a V


def minipipe_schedules() -> tuple[str, ...]:
    from minipipe.schedule.actions import SCHEDULES
    return SCHEDULES


def _time_interleaved(step_fns, n_warmup: int, n_steps: int, first: int = 0) -> list[list[float]]:
    """Steps first, first+1, ... of every contender, step i of all back to back before any runs
    step i+1, so a change in machine load hits all alike; the first n_warmup untimed."""
    times = [[] for _ in step_fns]
    for i in range(first, n_warmup + n_steps):
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


def torch_chunk_class():
    import torch
    from torch.utils.checkpoint import checkpoint

    class TorchChunk(torch.nn.Module):
        """A model chunk for torch's stages; on the last chunk the Head's (hidden, weight) becomes
        logits here (see the module docstring: torch cannot split a backward through that tuple)."""

        def __init__(self, layers, recompute: bool):
            super().__init__()
            self.layers, self.recompute = torch.nn.Sequential(*layers), recompute

        def run(self, value):
            value = self.layers(value)
            if isinstance(value, tuple):  # the training Head's (hidden, weight)
                hidden, weight = value
                return torch.nn.functional.linear(hidden, weight)
            return value

        def forward(self, value):
            return checkpoint(self.run, value, use_reentrant=False) if self.recompute else self.run(value)
    return TorchChunk


def torch_contender(name: str, cfg, layout, m: int, args, grad_clip: float = 0.0):
    """torch's `name` on this rank's chunks; returns (step(inputs, targets, lr=None), params, model
    chunks). step returns the step's mean loss where the last chunk is (else None) and, with
    grad_clip > 0, the global gradient norm: one all-reduce of the squared norms, then the clip
    (what a plain script does; minipipe's engine does the same). AdamW with minipipe's betas and
    weight decay (on every tensor: the same work). Raises ValueError where torch refuses (K, M)."""
    import torch
    from torch.distributed import pipelining
    from torch.distributed.pipelining.schedules import generate_rank_to_stage_mapping

    from minipipe.layers import build_layers
    from minipipe.models import registry
    per_rank, style = TORCH_SCHEDULES[name]
    k = layout.n_stages
    n_chunks = k * (per_rank or args.virtual_stages)
    mine = generate_rank_to_stage_mapping(k, n_chunks, style=style)[layout.stage]
    ranges = model_cut(cfg, n_chunks)
    chunk_cls = torch_chunk_class()
    chunks = []
    for c in mine:
        layers = build_layers(cfg, ranges[c])
        chunks.append(chunk_cls([layers[i] for i in ranges[c]], args.recompute != "never").to(layout.device))
    stages = [pipelining.PipelineStage(chunk, c, n_chunks, layout.device) for c, chunk in zip(mine, chunks)]
    loss_sum = registry.loss_fn(cfg, "torch")  # minipipe's own cross-entropy, of the logits

    def loss_fn(logits, y):
        return loss_sum(logits, y) / y.numel()
    sched = getattr(pipelining, name)(stages[0] if name in SINGLE_STAGE else stages, m, loss_fn=loss_fn)
    params = [p for chunk in chunks for p in chunk.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  foreach=True)
    first, last = 0 in mine, n_chunks - 1 in mine

    def step(inputs, targets, lr=None):
        losses = [] if last else None
        sched.step(*((inputs,) if first else ()), target=targets if last else None, losses=losses,
                   return_outputs=False)
        grad_norm = None
        if grad_clip:
            grads = [p.grad for p in params if p.grad is not None]
            norm_sq = torch.stack(torch._foreach_norm(grads)).double().square().sum()
            torch.distributed.all_reduce(norm_sq)
            grad_norm = float(norm_sq.sqrt())
            torch._foreach_mul_(grads, min(1.0, grad_clip / (grad_norm + 1e-6)))
        for group in optimizer.param_groups if lr is not None else ():
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (float(torch.stack(losses).mean()) if last else None), grad_norm
    return step, params, mine


def model_cut(cfg, n_chunks: int) -> list[list[int]]:
    """Layers of each model chunk: build_run's default cut (by parameter count)."""
    from minipipe import partition
    from minipipe.layers import count_layer_params
    balance = partition.balance_by_cost([float(c) for c in count_layer_params(cfg)], n_chunks)
    return [list(r) for r in partition.stage_ranges(balance)]


def _minipipe_run(schedule: str, k: int, model: dict, args):
    """minipipe's run of `schedule`, or None where it refuses (K, M, V)."""
    from minipipe.build import build_run
    from minipipe.config import make_config
    from minipipe.errors import ConfigError
    from minipipe.schedule.actions import Action, Kind, check_schedule
    v = args.virtual_stages if schedule == "interleaved" else 2 if schedule in V_PLACED else 1
    try:  # e.g. interleaved with M not a multiple of K: that row stays empty
        check_schedule(schedule, k, args.m, v)
    except ConfigError:
        return None
    run = build_run(make_config(**model, microbatches=args.m, recompute=args.recompute, schedule=schedule,
                                virtual_stages=v))
    # like for like: torch's namesake must run the same layers on each rank
    model_chunks = [run.engine.model_chunk(Action(Kind.FORWARD, 0, c, v)) for c in range(v)]
    ranges = model_cut(run.cfg, k * v)
    if [ranges[c] for c in model_chunks] != run.stage.chunks:
        raise SystemExit(f"minipipe {schedule}: this rank's chunks {run.stage.chunks} differ from the "
                         f"bench's cut {[ranges[c] for c in model_chunks]}")
    return run, model_chunks


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from minipipe.config import make_config
    from minipipe.data import load_settled
    from minipipe.dist import init_process_groups
    from minipipe.schedule.check import theory_bubble

    k = int(os.environ["WORLD_SIZE"])
    model = dict(model="transformer", layers=args.layers, d_model=args.d_model, heads=args.heads,
                 max_seq_len=args.seq_len, data="stdlib", batch_size=args.batch_size, grad_clip=0.0,
                 eval_every=0, device="cpu")
    cfg, dataset = load_settled(make_config(**model, microbatches=args.m))
    layout = init_process_groups(k, 1, cfg.timeout, "cpu")
    batches = [dataset.batch(i, cfg.batch_size) for i in range(args.warmup + args.steps)]
    contenders, runs, refused = [], {}, {}  # contenders: (name, step(i), parameters)
    for schedule in [s for s in minipipe_schedules() if s in args.schedules]:
        built = _minipipe_run(schedule, k, model, args)
        if built is None:
            refused[f"minipipe {schedule}"] = "minipipe refuses this K, M"
            continue
        run, model_chunks = runs[schedule] = built
        run.engine.timed = True
        contenders.append((f"minipipe {schedule}", lambda i, r=run: r.engine.train_step(
            *batches[i], i, r.cfg.lr, r.cfg.grad_clip), list(run.stage.parameters())))
        namesake = NAMESAKES.get(schedule)
        if namesake in args.schedules and model_chunks != _torch_chunks(namesake, k, layout.stage, args):
            raise SystemExit(f"minipipe {schedule} places chunks {model_chunks} on rank {layout.stage}, "
                             f"torch's {namesake} {_torch_chunks(namesake, k, layout.stage, args)}")
    for name in [n for n in TORCH_SCHEDULES if n in args.schedules]:
        try:  # torch refuses some (K, M): Schedule1F1B needs M >= K, DualPipeV M >= 2K, ...
            step, params, _ = torch_contender(name, cfg, layout, args.m, args)
        except ValueError as err:
            refused[name] = str(err).split("\n")[0][:100]
            continue
        contenders.append((name, lambda i, s=step: s(*batches[i]), params))
    # the first (untimed) step of each contender counts the bytes autograd saves
    peaks = [_peak_saved_bytes(lambda fn=fn: fn(0), params) for _, fn, params in contenders]
    times = _time_interleaved([fn for _, fn, _ in contenders], args.warmup, args.steps, first=1)
    result = {"tok_per_step": args.batch_size * args.seq_len, "refused": refused,
              "rows": {name: {"step_s": statistics.median(kept)} for (name, _, _), kept in zip(contenders, times)}}
    local = []  # per contender: bubble (minipipe's last step) and peak saved bytes, from every rank
    for (name, _, _), peak in zip(contenders, peaks):
        bubble = float("nan")
        if name.startswith("minipipe "):
            spans = runs[name.removeprefix("minipipe ")][0].engine.spans
            busy = sum(end - start for kind, _, _, start, end in spans if kind in COMPUTE)
            bubble = 1.0 - busy / (spans[-1][4] - spans[0][3])
        local += [bubble, peak]
    local = torch.tensor(local, dtype=torch.float64)
    gathered = [torch.empty_like(local) for _ in range(k)]
    dist.all_gather(gathered, local)
    for j, (name, _, _) in enumerate(contenders):
        row = result["rows"][name]
        row["peak_mib"] = [float(g[2 * j + 1]) / 2**20 for g in gathered]
        if name.startswith("minipipe "):
            schedule = name.removeprefix("minipipe ")
            row["bubble"] = sum(float(g[2 * j]) for g in gathered) / k
            row["bubble_theory"] = theory_bubble(schedule, k, args.m, runs[schedule][0].cfg.virtual_stages)
    if dist.get_rank() == 0:
        with open(args.result, "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


def _torch_chunks(name: str, k: int, rank: int, args) -> list[int]:
    from torch.distributed.pipelining.schedules import generate_rank_to_stage_mapping
    per_rank, style = TORCH_SCHEDULES[name]
    return generate_rank_to_stage_mapping(k, k * (per_rank or args.virtual_stages), style=style)[rank]


def head_check(args) -> str:
    """minipipe's Head + fused loss against torch's last-chunk form (logits in the chunk), forward
    and backward of one micro-batch at the largest M, alternating, one thread: what the like-for-like
    head costs or saves."""
    import torch

    from minipipe.config import make_config
    from minipipe.data import load_settled
    from minipipe.layers import build_layers
    from minipipe.models import registry
    torch.set_num_threads(args.threads)
    cfg, _ = load_settled(make_config(model="transformer", layers=args.layers, d_model=args.d_model,
                                      heads=args.heads, max_seq_len=args.seq_len, data="stdlib"))
    head = build_layers(cfg, [cfg.layers + 1])[cfg.layers + 1].train()
    torch_head = torch_chunk_class()([head], False)
    loss_sum = registry.loss_fn(cfg, "torch")
    rows = args.batch_size // max(map(int, args.microbatches.split(",")))
    x = torch.randn(rows, args.seq_len, args.d_model, requires_grad=True)
    y = torch.randint(0, cfg.vocab, (rows, args.seq_len))

    def fused(_):
        (loss_sum(head(x), y) / y.numel()).backward()

    def logits(_):
        (loss_sum(torch_head(x), y) / y.numel()).backward()
    ours, theirs = _time_interleaved([fused, logits], 5, 60)
    return (f"heads alone ({rows} rows x T={args.seq_len}, vocab {cfg.vocab}, forward + backward, 60 runs "
            f"alternating, median / min): minipipe's (hidden, weight) + fused loss {_ms(ours)}, torch's logits "
            f"chunk {_ms(theirs)}")


def _ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.2f} / {min(times) * 1e3:.2f} ms"


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


def main() -> None:
    from pipeline_report import table  # bench/ is the script's folder: first on sys.path
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="1,2", help="K values; include 1 for the efficiency column")
    parser.add_argument("--microbatches", default="4,8,16")
    parser.add_argument("--schedule", default="all",
                        help="comma-separated minipipe and torch names (gpipe,ScheduleDualPipeV), or all")
    parser.add_argument("--virtual-stages", type=int, default=2,
                        help="chunks per rank for interleaved, Interleaved1F1B and LoopedBFS")
    parser.add_argument("--recompute", default="never", choices=("always", "except_last", "never"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (>= 1: the first counts saved bytes)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender and repeat")
    parser.add_argument("--repeats", type=int, default=1, help="run the whole comparison this many times")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-microbatches", dest="m", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", dest="result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    known = (*minipipe_schedules(), *TORCH_SCHEDULES)
    args.schedules = known if args.schedule == "all" else args.schedule.split(",")
    unknown = [s for s in args.schedules if s not in known]
    if unknown:
        parser.error(f"--schedule {','.join(unknown)}: choose from {', '.join(known)}")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first step counts the saved bytes, untimed")
    if args.worker:
        return worker(args)
    grid = [(k, m) for k in map(int, args.stages.split(",")) for m in map(int, args.microbatches.split(","))]
    started = time.time()
    repeats = [{cell: launch(*cell, args) for cell in grid} for _ in range(args.repeats)]
    print(table(repeats, args, NAMESAKES))
    print(head_check(args))
    print(f"\n{time.time() - started:.0f} s; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
