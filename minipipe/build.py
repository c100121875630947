"""From a Config to everything one rank needs: data, process groups, its stage, optimizer, engine.

Everything that can be refused (flags, data, the cut into stages) is checked before this rank
waits on any other, so a bad flag fails every rank at once with the same message.
"""
import os
from dataclasses import dataclass

import torch

from minipipe import partition
from minipipe.config import Config
from minipipe.data import load_settled
from minipipe.dist import Layout, check_world, init_process_groups
from minipipe.errors import ConfigError
from minipipe.kernels import ops
from minipipe.layers import build_layers, chunk_inputs, count_layer_params, layer_param_numels
from minipipe.models import registry
from minipipe.pipeline.collectives import from_rank0
from minipipe.pipeline.engine import Engine
from minipipe.pipeline.optim import build_optimizer
from minipipe.pipeline.spec import PARAM_DTYPES, PipelineSpec, pipeline_spec
from minipipe.pipeline.stage import Stage
from minipipe.pipeline.warmup import warm_up

STATE_COPIES = 4  # weights, gradients, AdamW exp_avg and exp_avg_sq (minipipe.plan counts the same)


@dataclass
class Run:
    cfg: Config  # settled: the data's fields filled (minipipe.data.load_settled)
    spec: PipelineSpec  # the pipeline's facts, handed to whatever runs a step
    layout: Layout
    dataset: object
    balance: list  # layers per model chunk (K*V chunks; chunk c runs on stage spec.placement[c])
    costs: list  # per layer, what chose the cut
    cost_kind: str  # params | time | memory
    stage: Stage
    optimizer: torch.optim.Optimizer
    engine: Engine
    backend: str


def planned_stages(cfg) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    n_stages = cfg.stages or max(world_size // cfg.dp, 1)
    check_world(world_size, n_stages, cfg.dp)
    return n_stages


def build_run(cfg: Config) -> Run:
    """Everything this rank runs, from a Config of make_config (run.cfg: with the data's fields)."""
    cfg, dataset = load_settled(cfg)
    n_stages = planned_stages(cfg)
    spec = pipeline_spec(cfg, n_stages)
    n_chunks = spec.n_chunks
    n_layers = len(registry.layer_factories(cfg))
    if spec.virtual_stages > 1 and n_chunks > n_layers:
        raise ConfigError(f"{spec.virtual_stages} model chunks per stage x {n_stages} stages = {n_chunks} "
                          f"model chunks, but the model has {n_layers} layers; lower --virtual-stages, "
                          "use fewer --stages or add layers")
    if cfg.balance:  # its form (counts >= 1) was checked with the config; here against the model
        partition.check_balance(cfg.balance_counts, n_layers, n_stages, spec.virtual_stages)
    elif n_chunks > n_layers:
        partition.balance_by_cost([1.0] * n_layers, n_chunks)  # raises the "more stages" error
    layout = init_process_groups(n_stages, cfg.dp, cfg.timeout, cfg.device)
    if layout.device.type == "cuda":
        allow_tf32()
    try:
        backend = ops.resolve_backend(cfg.kernels, layout.device)
    except ValueError as err:  # the kernels know nothing of the trainer's error types
        raise ConfigError(f"--kernels {cfg.kernels}: {err}") from None
    check_model_fits(cfg, spec, layout.device)  # before a cut by time builds any layer
    balance, costs, cost_kind = _choose_balance(cfg, spec, layout, dataset, backend, n_layers)
    ranges = partition.stage_ranges(balance)
    chunks = [list(ranges[c]) for c in spec.chunks_on(layout.stage)]
    indices = [i for chunk in chunks for i in chunk]
    stage = Stage(build_layers(cfg, indices, backend), cfg.seed, chunks)
    stage.to(device=layout.device, dtype=spec.param_dtype)
    optimizer = build_optimizer(stage, cfg, backend)
    engine = Engine(stage, layout, spec=spec, loss_sum=registry.loss_fn(cfg, backend),
                    count_units=lambda targets: registry.count_loss_units(cfg, targets), optimizer=optimizer,
                    layer_param_counts=[len(n) for n in layer_param_numels(cfg)],
                    tied_weight=registry.tied_weight(cfg))
    return Run(cfg, spec, layout, dataset, balance, costs, cost_kind, stage, optimizer, engine, backend)


def check_model_fits(cfg, spec: PipelineSpec, device: torch.device) -> None:
    """The planner's first number, counted on the meta device before anything is allocated: the
    least any cut leaves on one stage (a 1/K share of the parameters, and at least the largest
    layer) needs weights, gradients and AdamW moments that fit in the device's whole memory. A
    size no machine holds (a 1e9 sequence length, a 2e9 width, 1e9 classes) is refused by name
    here, on every rank alike, not by the allocator or the out-of-memory killer. Activations come
    on top: python -m minipipe.plan counts them."""
    shape = ", ".join(f"{_flag(name)} {getattr(cfg, name)}" for name in
                      ("layers", "d_model", "max_seq_len", "vocab", "cells", "filters", "classes")
                      if getattr(cfg, name) is not None)
    fix = "choose a smaller model, or more --stages (python -m minipipe.plan shows what fits)"
    try:
        counts = count_layer_params(cfg, spec.tie_copied)
    except RuntimeError as err:  # a tensor of over 2**63 elements cannot even be sized
        raise ConfigError(f"the model ({shape}) has a weight too large to size "
                          f"({str(err).splitlines()[0]}); {fix}") from None
    params = max(-(-sum(counts) // spec.n_stages), max(counts))
    needed = STATE_COPIES * PARAM_DTYPES[cfg.dtype].itemsize * params
    if device.type == "cuda":
        memory, where = torch.cuda.mem_get_info(device)[1], f"{device}"
    else:
        memory, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host's RAM"
    if needed > memory:
        raise ConfigError(f"a stage would hold {params:,} parameters or more ({shape}): weights, "
                          f"gradients and AdamW's moments need {needed / 2**30:,.1f} GiB, more "
                          f"than the {memory / 2**30:,.1f} GiB of {where}; {fix}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def allow_tf32() -> None:
    """float32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa products, fp32
    accumulation): the --dtype float32 default of every GPU trainer since Ampere. CPU runs, and so
    the float64/float32 exactness tests, are unaffected."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the new API only
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def _choose_balance(cfg, spec, layout, dataset, backend, n_layers) -> tuple[list[int], list[float], str]:
    """(layers per chunk, the per-layer costs that chose the cut, what those costs measure)."""
    params = [float(c) for c in count_layer_params(cfg)]
    if cfg.balance:
        return cfg.balance_counts, params, "params"
    if cfg.balance_by == "params":
        return partition.balance_by_cost(params, spec.n_chunks), params, "params"
    # Profiled costs differ run to run: rank 0 measures, everyone uses its cut. One rank measures
    # every layer so that the costs compare (one device, one clock); it builds, profiles and
    # frees them one at a time, so a model that only fits cut into stages is profiled too.
    plan = [None]
    if layout.rank == 0:
        inputs, targets = dataset.batch(0, spec.microbatch_rows)
        inputs = inputs.to(layout.device, spec.param_dtype if inputs.is_floating_point() else None)
        loss_sum, targets = registry.loss_fn(cfg, backend), targets.to(layout.device)

        def build_layer(i):
            return build_layers(cfg, [i], backend)[i].to(layout.device, spec.param_dtype)
        costs = partition.profile_costs(build_layer, n_layers, inputs, cfg.balance_by, layout.device,
                                        loss=lambda output: loss_sum(output, targets),
                                        autocast_dtype=spec.autocast_dtype)
        plan = [(partition.balance_by_cost(costs, spec.n_chunks), costs)]
    balance, costs = from_rank0(layout, plan, f"rank 0's cut by measured {cfg.balance_by}")[0]
    return balance, costs, cfg.balance_by


def plan_table(run: Run) -> str:
    params = count_layer_params(run.cfg, run.spec.tie_copied)
    return partition.format_cut(run.balance, run.costs, params, run.cost_kind, run.spec.placement)


def warm_up_run(run) -> float:
    """warm_up for a built run: one micro-batch of its shape on each of this rank's chunks."""
    cfg, spec, device = run.cfg, run.spec, run.layout.device
    rows = spec.microbatch_rows
    targets = torch.zeros(registry.family(cfg).targets_shape(cfg, rows), dtype=torch.long, device=device)
    values = chunk_inputs(cfg, run.stage.chunks, rows, spec.param_dtype, device, spec.autocast_dtype)
    return warm_up(run.engine, values, targets, spec=spec)
