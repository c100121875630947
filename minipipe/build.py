"""From a Config to everything one rank needs: data, process groups, its stage, optimizer, engine.

Everything that can be refused (flags, data, the cut into stages) is checked before this rank
waits on any other, so a bad flag fails every rank at once with the same message.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minipipe import partition
from minipipe.data import load_dataset
from minipipe.dist import Layout, check_world, init_process_groups
from minipipe.errors import ConfigError
from minipipe.kernels import ops
from minipipe.layers import build_layers, chunk_inputs, count_layer_params, layer_param_numels
from minipipe.models import registry
from minipipe.pipeline.engine import Engine
from minipipe.pipeline.optim import build_optimizer
from minipipe.pipeline.stage import Stage
from minipipe.pipeline.warmup import warm_up
from minipipe.schedule.actions import check_schedule

PARAM_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                "bfloat16": torch.float32, "float16": torch.float32}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Run:
    cfg: object
    layout: Layout
    dataset: object
    balance: list  # layers per model chunk (K*V chunks; chunk c runs on stage c mod K)
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


def build_run(cfg) -> Run:
    dataset = load_dataset(cfg)
    n_stages = planned_stages(cfg)
    check_schedule(cfg.schedule, n_stages, cfg.microbatches, cfg.virtual_stages)
    n_chunks = n_stages * cfg.virtual_stages
    n_layers = len(registry.layer_factories(cfg))
    if cfg.virtual_stages > 1 and n_chunks > n_layers:
        raise ConfigError(f"--virtual-stages {cfg.virtual_stages} x {n_stages} stages = {n_chunks} model "
                          f"chunks, but the model has {n_layers} layers; lower --virtual-stages or "
                          "add layers")
    if cfg.balance:  # its form (counts >= 1) was checked with the config; here against the model
        partition.check_balance([int(x) for x in cfg.balance.split(",")], n_layers, n_stages,
                                cfg.virtual_stages)
    elif n_chunks > n_layers:
        partition.balance_by_cost([1.0] * n_layers, n_chunks)  # raises the "more stages" error
    layout = init_process_groups(n_stages, cfg.dp, cfg.timeout, cfg.device)
    if layout.device.type == "cuda":
        allow_tf32()
    try:
        backend = ops.resolve_backend(cfg.kernels, layout.device)
    except ValueError as err:  # the kernels know nothing of the trainer's error types
        raise ConfigError(f"--kernels {cfg.kernels}: {err}") from None
    balance, costs, cost_kind = _choose_balance(cfg, layout, dataset, backend, n_layers, n_chunks)
    chunks = [list(r) for r in partition.stage_ranges(balance)[layout.stage::n_stages]]
    indices = [i for chunk in chunks for i in chunk]
    stage = Stage(build_layers(cfg, indices, backend), cfg.seed, chunks)
    stage.to(device=layout.device, dtype=PARAM_DTYPES[cfg.dtype])
    optimizer = build_optimizer(stage, cfg, backend)
    engine = Engine(stage, layout, registry.loss_fn(cfg, backend),
                    lambda targets: registry.count_loss_units(cfg, targets), optimizer,
                    cfg.microbatches, cfg.recompute, cfg.timeout, AUTOCAST_DTYPES.get(cfg.dtype),
                    cfg.deferred_bn, [len(n) for n in layer_param_numels(cfg)],
                    PARAM_DTYPES[cfg.dtype], cfg.schedule, cfg.virtual_stages)
    return Run(cfg, layout, dataset, balance, costs, cost_kind, stage, optimizer, engine, backend)


def allow_tf32() -> None:
    """float32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa products, fp32
    accumulation): the --dtype float32 default of every GPU trainer since Ampere. CPU runs, and so
    the float64/float32 exactness tests, are unaffected."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the new API only
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def _choose_balance(cfg, layout, dataset, backend, n_layers, n_chunks) -> tuple[list[int], list[float], str]:
    """(layers per chunk, the per-layer costs that chose the cut, what those costs measure)."""
    params = [float(c) for c in count_layer_params(cfg)]
    if cfg.balance:
        return [int(x) for x in cfg.balance.split(",")], params, "params"
    if cfg.balance_by == "params":
        return partition.balance_by_cost(params, n_chunks), params, "params"
    # Profiled costs differ run to run: rank 0 measures, everyone uses its cut. One rank measures
    # every layer so that the costs compare (one device, one clock); it builds, profiles and
    # frees them one at a time, so a model that only fits cut into stages is profiled too.
    plan = [None]
    if layout.rank == 0:
        inputs, targets = dataset.batch(0, cfg.batch_size // cfg.dp // cfg.microbatches)
        inputs = inputs.to(layout.device, PARAM_DTYPES[cfg.dtype] if inputs.is_floating_point() else None)
        loss_sum, targets = registry.loss_fn(cfg, backend), targets.to(layout.device)

        def build_layer(i):
            return build_layers(cfg, [i], backend)[i].to(layout.device, PARAM_DTYPES[cfg.dtype])
        costs = partition.profile_costs(build_layer, n_layers, inputs, cfg.balance_by, layout.device,
                                        loss=lambda output: loss_sum(output, targets),
                                        autocast_dtype=AUTOCAST_DTYPES.get(cfg.dtype))
        plan = [(partition.balance_by_cost(costs, n_chunks), costs)]
    if layout.world_size > 1:
        dist.broadcast_object_list(plan, src=0)
    balance, costs = plan[0]
    return balance, costs, cfg.balance_by


def plan_table(run: Run) -> str:
    params = count_layer_params(run.cfg, run.layout.n_stages)
    return partition.format_cut(run.balance, run.costs, params, run.cost_kind, run.layout.n_stages)


def warm_up_run(run) -> float:
    """warm_up for a built run: one micro-batch of its shape on each of this rank's chunks."""
    cfg, device = run.cfg, run.layout.device
    rows = cfg.batch_size // cfg.dp // cfg.microbatches
    param_dtype = next(run.stage.parameters()).dtype
    targets = torch.zeros(registry.family(cfg).targets_shape(cfg, rows), dtype=torch.long, device=device)
    values = chunk_inputs(cfg, run.stage.chunks, rows, param_dtype, device, run.engine.autocast_dtype)
    return warm_up(run.engine, values, targets)
