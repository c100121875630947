"""Plan a run without launching it: each stage's memory, the bubble, the FLOPs, and the largest
model that fits a memory budget (the question of GPipe's Table 1).

    python -m minipipe.plan --preset gpipe --stages 4 --microbatches 8 --memory-budget 80GiB
    python -m minipipe.plan --preset gpipe --stages 8 --memory-budget 16GiB --largest
    python -m minipipe.plan --preset gpipe --stages 4 --microbatches 8 --schedule 1f1b

Takes train.py's flags. Every number comes from the model's layers built on the 'meta' device (no
memory, no data, no processes; traced as fake CPU tensors): parameters are counted,
activations are the bytes autograd saves for backward while one micro-batch runs through the
layers (saved_tensors_hooks, each storage counted once), FLOPs come from torch's FlopCounterMode
over a forward and backward.

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
Not counted: communication buffers, the allocator's slack, one op's temporary workspace, the CUDA
context. Estimates follow the plain-torch ops as the CPU runs them (SDPA's flash kernel, like a
GPU's and Triton's, saves no T x T scores and reads grouped-query K and V once); under bf16/fp16
the layers hold float32 weights and are traced under autocast, as the run is (the activations
have the run's dtypes, a float32 Transformer boundary included). Identical layers are traced once.
"""
import argparse
import dataclasses
import re
import sys
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minipipe import partition
from minipipe.build import STATE_COPIES
from minipipe.command_line import build_parser, parse_config
from minipipe.config import Config
from minipipe.errors import ConfigError
from minipipe.layers import tied_numel
from minipipe.models import registry
from minipipe.pipeline.spec import PipelineSpec, pipeline_spec
from minipipe.pipeline.split_backward import backward_input
from minipipe.pipeline.values import as_tuple
from minipipe.schedule.actions import Kind
from minipipe.schedule.check import ideal_bubble

COMPUTE_KINDS = (Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT)

PARAM_BYTES = {"float64": 8}  # bf16/fp16 runs keep fp32 weights (autocast): 4 bytes
UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_TRACES: dict = {}  # (previous layer, layer, input) signature -> traced numbers; layers repeat


@dataclass
class LayerProfile:
    params: int
    input_bytes: int  # the value the layer receives, one micro-batch
    alone_bytes: int  # saved for backward when the layer starts a stage (its input excluded)
    chained_bytes: int  # saved for backward and not already saved by the previous layer
    flops: float  # forward + backward, one micro-batch
    weight_grad_bytes: int  # split backward: gradients kept from I to W (the last layer's with the loss)
    freed_at_input_bytes: int  # split backward, the layer topping a chunk: saved bytes gone when I returns


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


# ---- tracing layers on the meta device -------------------------------------------------------
def _spec(value) -> tuple:
    return isinstance(value, tuple), tuple((tuple(t.shape), t.dtype) for t in as_tuple(value))


def _fresh(spec, requires_grad: bool):
    is_tuple, entries = spec
    tensors = tuple(torch.empty(shape, dtype=dtype).requires_grad_(  # on the tracing device
        requires_grad and dtype.is_floating_point) for shape, dtype in entries)
    return tensors if is_tuple else tensors[0]


def _storage(t: torch.Tensor):
    return t.untyped_storage()._cdata  # the storage's identity: views of one tensor share it


def _signature(layer: nn.Module) -> tuple:
    """What decides a layer's saved bytes and FLOPs: its structure, shapes, dtypes and settings."""
    settings = tuple((name, str(value)) for module in layer.modules() for name, value in
                     sorted(vars(module).items()) if isinstance(value, (int, float, str, list, tuple)))
    dtypes = tuple(p.dtype for p in layer.parameters())
    return repr(layer), settings, dtypes


def _trace(previous: nn.Module | None, layer: nn.Module, spec, model_input: bool) -> tuple:
    """(alone bytes, chained bytes, output spec) of `layer` fed from `previous` (if any)."""
    saved = {"previous": {}, "layer": {}}
    params = {_storage(p) for m in (previous, layer) if m is not None for p in m.parameters()}
    phase = "previous"

    def pack(tensor):
        if _storage(tensor) not in params:
            saved[phase][_storage(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = _fresh(spec, requires_grad=not model_input)
        kept = [value]  # storages stay alive (and their identities unique) until counted
        if previous is not None:
            value = previous(value)
            kept.append(value)
        phase = "layer"
        inputs = {_storage(t) for t in as_tuple(value)}
        output = layer(value)
    layer_saved = saved["layer"]
    alone = sum(b for s, b in layer_saved.items() if s not in inputs)
    chained = sum(b for s, b in layer_saved.items() if s not in saved["previous"])
    return alone, chained, _spec(output)


class _Saved:
    """A saved tensor's stand-in: it dies with the autograd node that saved it. Detached: a saved
    output held with its grad_fn would keep its own node alive (autograd's own saving avoids it)."""

    def __init__(self, tensor):
        self.tensor = tensor.detach()


def _split_backward_bytes(layers: list[nn.Module], spec) -> tuple[int, int]:
    """The split backward of `layers` on one micro-batch, run as the engine runs it: (the
    gradients I captures for W, the saved bytes freed when I returns). The engine drops the
    outputs after I; W keeps only the cut nodes and the graph below them, so what the nodes above
    every cut saved (on the last chunk the loss's log-probabilities) goes then. Measured, not
    assumed: each saved tensor's stand-in dies with its node. The input's storage is the previous
    chunk's (or the boundary's) and is not counted here."""
    saved = []  # (weak stand-in, storage, bytes) per saved tensor
    params = {_storage(p) for layer in layers for p in layer.parameters()}

    def pack(tensor):
        stand_in = _Saved(tensor)
        if _storage(tensor) not in params:
            saved.append((weakref.ref(stand_in), _storage(tensor), tensor.untyped_storage().nbytes()))
        return stand_in

    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.tensor):
        value = _fresh(spec, requires_grad=True)
        outputs = [t for t in as_tuple(nn.Sequential(*layers)(value)) if t.requires_grad]
        pending = backward_input(outputs, [torch.empty_like(t) for t in outputs],
                                 [t for t in as_tuple(value) if t.requires_grad])
    del outputs
    inputs, alive, size = {_storage(t) for t in as_tuple(value)}, set(), {}
    for ref, storage, nbytes in saved:
        size[storage] = nbytes
        if ref() is not None:
            alive.add(storage)
    freed = sum(b for storage, b in size.items() if storage not in alive and storage not in inputs)
    return pending.held_bytes(), freed


def _flops(layer: nn.Module, spec, model_input: bool) -> float:
    # The model's FLOPs whichever attention kernel runs: SDPA's math path counts its two matmuls.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        output = layer(_fresh(spec, requires_grad=not model_input))
        outputs = [t for t in as_tuple(output) if t.requires_grad]
        if outputs:
            torch.autograd.backward([t.sum() for t in outputs])
    return float(counter.get_total_flops())


class _Loss(nn.Module):
    """The loss as the last 'layer' of the last stage: what it saves counts there too."""

    def __init__(self, cfg, targets_shape):
        super().__init__()
        self.loss_sum, self.targets_shape = registry.loss_fn(cfg), targets_shape

    def forward(self, output):
        return self.loss_sum(output, torch.zeros(self.targets_shape, dtype=torch.long))


def _as_the_run_computes(spec: PipelineSpec):
    """The context to trace the meta-built layers in, with the activation dtypes and the saved
    tensors of the run: the layers move to fake CPU tensors (no memory; once, and only when a
    trace is not cached), under bf16/fp16 autocast when the run has it. Meta tensors would ignore
    autocast (the Transformer's residual stream, its stage boundary, stays float32 in the run;
    CPU autocast casts matmuls, convolutions and elementwise ops as CUDA's does), and SDPA on the
    meta device takes the math path, which saves the T x T scores and, for grouped-query
    attention, K and V repeated per query head. On fake CPU tensors SDPA saves what the CPU's
    flash kernel saves: no scores, the shared K and V once, as a GPU's flash kernel does."""
    autocast, moved = spec.autocast_dtype, set()
    fake = FakeTensorMode(allow_non_fake_inputs=True)

    @contextmanager
    def tracing(*layers):
        with fake:
            for layer in layers:
                if layer is not None and id(layer) not in moved:
                    layer.to_empty(device="cpu")
                    moved.add(id(layer))
        with fake, (torch.autocast("cpu", dtype=autocast) if autocast else nullcontext()):
            yield
    return tracing


def resolve_data_fields(cfg) -> Config:
    """A copy of cfg with the data-dependent fields filled as the default data would fill them
    (bytes: vocab 256; digits: 1 channel, 10 classes), so planning reads no data."""
    return dataclasses.replace(cfg, **registry.family(cfg).planning_defaults(cfg))


def profile_layers(cfg, *, spec: PipelineSpec) -> list[LayerProfile]:
    """One profile per global layer, plus the loss last, for one micro-batch of the run."""
    cfg = resolve_data_fields(cfg)
    family = registry.family(cfg)
    micro, dtype = spec.microbatch_rows, spec.param_dtype
    built = {}  # one module per distinct factory: the Transformer's blocks share one
    with torch.device("meta"):
        layers = []
        for factory in registry.layer_factories(cfg):
            if id(factory) not in built:
                built[id(factory)] = factory().to(dtype)
            layers.append(built[id(factory)])
        layers.append(_Loss(cfg, family.targets_shape(cfg, micro)))
    trace_as_the_run_computes = _as_the_run_computes(spec)
    spec = (False, ((family.input_shape(cfg, micro), torch.long if family.reads_tokens else dtype),))
    profiles, previous, previous_spec = [], None, None
    signatures = {id(layer): _signature(layer) for layer in layers}
    for i, layer in enumerate(layers):
        key = (cfg.dtype, signatures[id(previous)] if previous is not None else None, previous_spec,
               signatures[id(layer)], spec)
        if key not in _TRACES:
            first = previous is None
            with trace_as_the_run_computes(previous, layer):
                alone, chained, out_spec = _trace(previous, layer, previous_spec if not first else spec,
                                                  model_input=first)
                split = (0, 0) if first or i == len(layers) - 1 else _split_backward_bytes(
                    [layer] + layers[i + 1:] if i == len(layers) - 2 else [layer], spec)
                _TRACES[key] = alone, chained, out_spec, _flops(layer, spec, model_input=first), split
        alone, chained, out_spec, flops, split = _TRACES[key]
        input_bytes = sum(torch.Size(s).numel() * d.itemsize for s, d in spec[1])
        params = sum(p.numel() for p in layer.parameters())
        profiles.append(LayerProfile(params, input_bytes, alone, chained, flops, *split))
        previous, previous_spec, spec = layer, spec, out_spec
    return profiles


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
        # with the loss on the last chunk); the first chunk's I frees nothing, W is its backward
        freed = [profiles[r.stop - 1].freed_at_input_bytes if r.start > 0 else 0 for r in chunks]
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
