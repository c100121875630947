"""Plan a run without launching it: each stage's memory, the bubble, the FLOPs, and the largest
model that fits a memory budget (the question of GPipe's Table 1).

    python -m minipipe.plan --preset gpipe --stages 4 --microbatches 8 --memory-budget 80GiB
    python -m minipipe.plan --preset gpipe --stages 8 --memory-budget 16GiB --largest
    python -m minipipe.plan --preset gpipe --stages 4 --microbatches 8 --schedule 1f1b

Takes train.py's flags. Every number comes from the model's layers built on the 'meta' device and
traced (minipipe/layer_profile.py: no memory, no data, no processes): parameters are counted,
activations are the bytes autograd saves for backward while one micro-batch runs through the
layers, FLOPs are counted over a forward and backward.

Bytes of a stage (GPipe section 2.3), per device:
    state        weights + gradients + AdamW's two moments: 4 copies of each parameter
    boundary     a chunk's input for one micro-batch (what crosses from the previous chunk)
    intermediate what a chunk's layers (and, in the last chunk, the loss) save for backward,
                 for one micro-batch, its input excluded
    activations  the peak over the stage's schedule (--schedule, --virtual-stages) of what the
                 micro-batches in flight hold: with re-materialisation each keeps its boundary,
                 plus one chunk's intermediate during a backward (gpipe: M x boundary +
                 intermediate; 1f1b: (K - stage) x boundary + intermediate); without, each in
                 flight keeps boundary + intermediate (gpipe: M x (boundary + intermediate)).
    split        I (a split backward's input half) peaks with the chunk's whole graph and the
                 gradients it captures for W; when it returns, what the nodes above every cut
                 saved (the loss's, on the last chunk) is freed, and the rest waits for W.
Not counted: communication buffers, the allocator's slack, one op's temporary workspace, the CUDA
context.
"""
import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass

from minipipe import partition
from minipipe.build import STATE_COPIES
from minipipe.command_line import build_parser, parse_config
from minipipe.config import Config
from minipipe.errors import ConfigError
from minipipe.layer_profile import LayerProfile, profile_layers, resolve_data_fields
from minipipe.layers import tied_numel
from minipipe.models import registry
from minipipe.pipeline.spec import PipelineSpec, pipeline_spec
from minipipe.schedule.actions import Kind
from minipipe.schedule.check import ideal_bubble

COMPUTE_KINDS = (Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT)

PARAM_BYTES = {"float64": 8}  # bf16/fp16 runs keep fp32 weights (autocast): 4 bytes
UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


@dataclass
class StagePlan:
    chunks: list[range]  # global layers of each of the stage's model chunks
    params: int
    state_bytes: int
    boundary_bytes: list[int]  # per chunk, one micro-batch
    intermediate_bytes: list[int]  # per chunk, one micro-batch
    order: list[tuple[Kind, int]]  # the schedule's (compute kind, chunk) sequence on this stage
    weight_grad_bytes: list[int]  # per chunk, one micro-batch: what W keeps beyond the graph
    freed_at_input_bytes: list[int]  # per chunk, one micro-batch: the graph's part that I's end frees

    @property
    def layers(self) -> list[int]:
        return [i for chunk in self.chunks for i in chunk]

    def activation_bytes(self, remat: bool) -> int:
        """Replay the schedule's forwards and backwards and keep the peak held bytes. A split
        backward's I peaks with the whole graph (rebuilt, under re-materialisation) and the
        captured gradients; when it returns, the nodes above every cut (the loss's, on the last
        chunk) go with the outputs, and the rest of the graph and the gradients wait for its W
        (minipipe/pipeline/split_backward.py)."""
        held = peak = 0
        for kind, v in self.order:
            kept = self.boundary_bytes[v] + (0 if remat else self.intermediate_bytes[v])
            rebuilt = self.intermediate_bytes[v] if remat else 0
            if kind is Kind.FORWARD:
                held += kept
                peak = max(peak, held)
            elif kind is Kind.BACKWARD:  # re-materialised: the intermediates live while it runs
                peak = max(peak, held + rebuilt)
                held -= kept
            elif kind is Kind.BACKWARD_INPUT:
                held += rebuilt + self.weight_grad_bytes[v]
                peak = max(peak, held)
                held -= self.freed_at_input_bytes[v]
            else:
                held -= kept + rebuilt + self.weight_grad_bytes[v] - self.freed_at_input_bytes[v]
        return peak

    def total_bytes(self, recompute: str) -> int:
        return self.state_bytes + self.activation_bytes(recompute != "never")


@dataclass
class Plan:
    cfg: Config
    spec: PipelineSpec
    stages: list[StagePlan]
    flops_per_unit: float  # per token (Transformer) or sample (AmoebaNet), forward + backward
    unit: str

    def peak_bytes(self) -> int:
        return max(stage.total_bytes(self.spec.recompute) for stage in self.stages)


# ---- plans --------------------------------------------------------------------------------
def _balance(cfg, profiles: list[LayerProfile], *, spec: PipelineSpec) -> list[int]:
    layers = profiles[:-1]
    if cfg.balance:
        return partition.check_balance(cfg.balance_counts, len(layers), spec.n_stages, spec.virtual_stages)
    # The planner profiles nothing: 'time' cuts by FLOPs, 'memory' by state + saved bytes.
    costs = {"params": [p.params for p in layers], "time": [p.flops for p in layers],
             "memory": [STATE_COPIES * p.params + p.chained_bytes for p in layers]}[cfg.balance_by]
    return partition.balance_by_cost([float(c) for c in costs], spec.n_chunks)


def plan_run(cfg, n_stages: int) -> Plan:
    """Per stage: its chunks (chunk c of K*V on stage spec.placement[c], as build_run cuts them),
    state bytes, and the activation peak of cfg's schedule."""
    cfg = resolve_data_fields(cfg)  # the tied weight's size needs the vocabulary too
    spec = pipeline_spec(cfg, n_stages)
    profiles = profile_layers(cfg, spec=spec)
    param_bytes = PARAM_BYTES.get(cfg.dtype, 4)
    ranges = partition.stage_ranges(_balance(cfg, profiles, spec=spec))
    last = len(ranges) - 1
    stages = []
    for s in range(n_stages):
        chunks = [ranges[c] for c in spec.chunks_on(s)]
        owned = [[profiles[i] for i in ranges[c]] + ([profiles[-1]] if c == last else [])
                 for c in spec.chunks_on(s)]
        params = sum(p.params for own in owned for p in own)
        if not spec.tie_copied and s == spec.placement[0]:  # one stage holds the embedding and the head
            params -= tied_numel(cfg)  # a tied weight once
        order = [(a.kind, a.chunk) for a in spec.actions[s] if a.kind in COMPUTE_KINDS]
        # the first chunk's inputs have no gradient: its W keeps only its output's gradient
        weight_grads = [sum(p.weight_grad_bytes for p in own) if r.start > 0 else
                        profiles[r.stop].input_bytes if r.stop < len(profiles) - 1 else 0
                        for r, own in zip(chunks, owned)]
        # only the nodes above every cut go when I returns: those of the chunk's top layer (traced
        # with the loss on the last chunk, and with the layer below it if any); the first chunk's I
        # frees nothing, W is its whole backward
        freed = [0 if r.start == 0 else profiles[r.stop - 1].freed_chained_bytes if len(r) > 1 else
                 profiles[r.stop - 1].freed_alone_bytes for r in chunks]
        stages.append(StagePlan(chunks, params, STATE_COPIES * param_bytes * params,
                                [own[0].input_bytes for own in owned],
                                [own[0].alone_bytes + sum(p.chained_bytes for p in own[1:]) for own in owned],
                                order, weight_grads, freed))
    return Plan(cfg, spec, stages, _flops_per_unit(cfg, profiles, spec=spec), registry.family(cfg).unit)


def _flops_per_unit(cfg, profiles: list[LayerProfile], *, spec: PipelineSpec) -> float:
    units = spec.microbatch_rows * registry.family(cfg).units_per_sample(cfg)
    return sum(p.flops for p in profiles) / units


def model_flops_per_unit(cfg, *, spec: PipelineSpec) -> float:
    """Training FLOPs (forward + backward, no recompute) per token or sample, as MFU counts them."""
    return _flops_per_unit(cfg, profile_layers(cfg, spec=spec), spec=spec)


def largest_that_fits(cfg, n_stages: int, budget: int) -> Plan | None:
    """The deepest model of cfg's shape (Transformer blocks or AmoebaNet cells) whose every stage
    fits `budget` bytes, found by doubling then bisection; None when even the smallest does not."""
    family = registry.family(cfg)
    field, smallest = family.depth_field, family.smallest_depth(n_stages * cfg.virtual_stages)

    def fitting(depth):
        plan = plan_run(dataclasses.replace(cfg, **{field: depth}), n_stages)
        return plan if plan.peak_bytes() <= budget else None

    best = fitting(smallest)
    if best is None:
        return None
    low, high = smallest, 2 * smallest
    while (plan := fitting(high)) is not None:
        best, low, high = plan, high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        if (plan := fitting(middle)) is not None:
            best, low = plan, middle
        else:
            high = middle
    return best


# ---- the command --------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
    """'80GiB', '16GB', '512MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kmgtKMGT][iI]?)?[bB]?\s*", text)
    try:
        return int(float(match.group(1)) * UNITS.get((match.group(2) or "").lower(), 1))
    except (AttributeError, ValueError):
        raise ConfigError(f"--memory-budget {text!r}: give bytes with a unit, e.g. 80GiB or 16GB")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def format_plan(plan: Plan, budget: int | None) -> str:
    cfg, spec, k = plan.cfg, plan.spec, len(plan.stages)
    shape = registry.family(cfg).describe(cfg)
    rows = [("stage", "layers", "params", "weights+grads+adam", "act. re-mat", "act. no re-mat",
             f"total ({spec.recompute})") + (("fits",) if budget else ())]
    for s, stage in enumerate(plan.stages):
        total = stage.total_bytes(spec.recompute)
        layers = ",".join(f"{r.start}-{r.stop - 1}" for r in stage.chunks)
        rows.append((str(s), layers, f"{stage.params:,}",
                     _size(stage.state_bytes), _size(stage.activation_bytes(True)),
                     _size(stage.activation_bytes(False)), _size(total))
                    + (("yes" if total <= budget else "NO",) if budget else ()))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
    params = sum(stage.params for stage in plan.stages) - (tied_numel(cfg) if spec.tie_copied else 0)
    if registry.tied_weight(cfg) is not None:
        shape += (", tied embedding (one copy on the first and one on the last chunk's stage)"
                  if spec.tie_copied else ", tied embedding")
    v, m = spec.virtual_stages, spec.n_microbatches
    lines = [f"{cfg.model}: {shape}; {params:,} parameters; {spec.schedule}, K={k}, M={m}, V={v}, "
             f"micro-batch {spec.microbatch_rows}, {cfg.dtype}", table,
             f"bubble {ideal_bubble(spec.schedule, k, m, v)}",
             f"model FLOPs per {plan.unit} (forward + backward): {plan.flops_per_unit / 1e9:.4g} GFLOP"]
    if budget:
        verdict = "fits" if plan.peak_bytes() <= budget else "does NOT fit"
        lines.append(f"largest stage needs {_size(plan.peak_bytes())}: {verdict} in {_size(budget)}")
    return "\n".join(lines)


def planned_config(argv: list) -> tuple[Config, str]:
    """The config of the run being planned, and a line saying which dtype the plan assumes.
    `--dtype auto` resolves where the run happens, not here: a plan made on a laptop for a GPU
    budget is for the GPU's bfloat16, unless --dtype or --device cpu says otherwise."""
    cfg = parse_config(argv)
    if cfg.device == "auto" and cfg.dtype != parse_config([*argv, "--device", "cuda"]).dtype:
        cfg = dataclasses.replace(cfg, dtype=parse_config([*argv, "--device", "cuda"]).dtype)
        return cfg, (f"dtype {cfg.dtype}: --dtype auto on a GPU (say --dtype float32, or --device "
                     f"cpu for a CPU run, to plan another)")
    return cfg, f"dtype {cfg.dtype}: as --dtype and --device say"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    parser.description = "minipipe planner: per-stage memory, bubble and FLOPs; launches nothing"
    own = argparse.ArgumentParser(add_help=False)
    for p in (parser, own):
        p.add_argument("--memory-budget", help="bytes per device, e.g. 80GiB; marks what fits")
        p.add_argument("--largest", action="store_true",
                       help="search the most layers (Transformer) or cells (AmoebaNet) that fit the budget")
    parser.parse_args(argv)  # --help, and every flag checked against the full list
    args, rest = own.parse_known_args(argv)
    try:
        cfg, dtype_note = planned_config(rest)
        print(dtype_note)
        n_stages = cfg.stages or 1
        budget = parse_bytes(args.memory_budget) if args.memory_budget else None
        if args.largest:
            if budget is None:
                raise ConfigError("--largest needs --memory-budget, e.g. --memory-budget 16GiB")
            plan = largest_that_fits(cfg, n_stages, budget)
            if plan is None:
                print(f"even the smallest model does not fit {_size(budget)} with K={n_stages}")
                return 1
            field = registry.family(cfg).depth_field
            print(f"largest that fits {_size(budget)} with K={n_stages}: --{field} "
                  f"{getattr(plan.cfg, field)}")
        else:
            plan = plan_run(cfg, n_stages)
        print(format_plan(plan, budget))
    except ConfigError as err:
        print(f"minipipe plan error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
