"""Layer costs -> a contiguous cut of the layer list into K stages (the balance).

A balance is a list of K layer counts, each >= 1, summing to the number of layers; stage s holds
the global layers `stage_ranges(balance)[s]`. `balance_by_cost` minimises the largest stage cost
exactly: the slowest stage sets the pipeline's clock (GPipe section 2.2), so the max is what
matters, not the variance. Costs come from parameter counts (minipipe.layers.count_layer_params) or from
profiling one micro-batch (`profile_costs`, by 'time' or 'memory').
"""
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import nn

from minipipe.errors import ConfigError
from minipipe.pipeline.recompute import grad_leaf
from minipipe.pipeline.values import as_tuple, map_tensors

PROFILE_RUNS = 5  # timed runs per layer after one warm-up; the median is the cost


def balance_by_cost(costs: Sequence[float], n_stages: int) -> list[int]:
    """Cut len(costs) layers into n_stages non-empty contiguous stages minimising the max stage cost.

    Exact: dynamic programming over prefix sums finds the optimal bound; then, among all cuts that
    meet it, each stage in turn takes as many layers as it can (earlier stages fuller, the last
    stage, which also computes the loss, lightest). Costs must be >= 0.
    """
    n_layers = len(costs)
    if n_stages < 1:
        raise ConfigError(f"--stages must be >= 1, got {n_stages}")
    if n_stages > n_layers:
        raise ConfigError(f"more stages than layers: {n_layers} layers cannot be cut into {n_stages} "
                          "stages; lower --stages or raise --layers")
    if any(c < 0 for c in costs):
        raise ValueError(f"layer costs must be >= 0, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def cost(i, j):  # layers i..j-1; every comparison below uses this one formula
        return prefix[j] - prefix[i]

    # best[j]: the smallest max stage cost cutting layers 0..j-1 into k stages (k grows per pass).
    best = [cost(0, j) for j in range(n_layers + 1)]
    for k in range(2, n_stages + 1):
        best = [float("inf")] * k + [min(max(best[i], cost(i, j)) for i in range(k - 1, j))
                                     for j in range(k, n_layers + 1)]
    bound = best[n_layers]

    balance, start = [], 0
    for s in range(n_stages):
        stages_after = n_stages - 1 - s
        end = start + 1
        while end < n_layers - stages_after and cost(start, end + 1) <= bound:
            end += 1
        if s == n_stages - 1:
            end = n_layers
        balance.append(end - start)
        start = end
    return balance


def check_balance(balance: Sequence[int], n_layers: int, n_stages: int, virtual_stages: int = 1) -> list[int]:
    """Validate an explicit --balance (e.g. 3,3,2) against the model and the K*V model chunks."""
    balance = list(balance)
    n_chunks = n_stages * virtual_stages
    if len(balance) != n_chunks:
        wanted = (f"--stages is {n_stages}; give one layer count per stage" if virtual_stages == 1 else
                  f"--stages {n_stages} x --virtual-stages {virtual_stages} = {n_chunks} model chunks; "
                  f"give one layer count per chunk")
        raise ConfigError(f"--balance {_csv(balance)} has {len(balance)} entries but {wanted}")
    if any(b < 1 for b in balance):
        raise ConfigError(f"--balance {_csv(balance)}: every stage needs at least 1 layer")
    if sum(balance) != n_layers:
        raise ConfigError(f"--balance {_csv(balance)} sums to {sum(balance)} but the model has "
                          f"{n_layers} layers; make the counts add up to {n_layers}")
    return balance


def stage_ranges(balance: Sequence[int]) -> list[range]:
    """Global layer indices held by each stage."""
    ranges, start = [], 0
    for count in balance:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def profile_costs(build_layer: Callable[[int], nn.Module], n_layers: int, sample_input, by: str,
                  device, loss: Callable | None = None, autocast_dtype=None) -> list[float]:
    """Profile each layer on one micro-batch: by='time' (seconds of forward+backward, median of
    PROFILE_RUNS after a warm-up) or by='memory' (bytes saved for backward + parameter bytes).

    Layer i comes from build_layer(i), already on `device`, is profiled, makes layer i + 1's input
    (a Tensor or a tuple passed as one argument: the layer contract) and is dropped before layer
    i + 1 is built: one layer exists at a time, so a model that needs a pipeline to fit is
    profiled on one device. `loss(output)` is part of the last layer's cost (the
    Transformer's fused head leaves the logits and the cross entropy to the loss). Under
    autocast_dtype the layers run as the engine runs them. Profiling leaves no trace: parameter
    .grad, buffers (e.g. BatchNorm running stats) and the RNG state are as they were.
    """
    if by not in ("time", "memory"):
        raise ConfigError(f"unknown profiling mode {by!r}; use 'time' or 'memory'")
    device = torch.device(device)
    value = map_tensors(lambda t: t.to(device), sample_input)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    costs = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(n_layers):
            layer = build_layer(i)
            finish = loss if i == n_layers - 1 and loss is not None else _sum_outputs
            saved_buffers = [(b, b.detach().clone()) for b in layer.buffers()]
            with autocast():
                if by == "time":
                    costs.append(_time_layer(layer, value, finish, device))
                else:
                    costs.append(_memory_layer(layer, value, finish))
                with torch.no_grad():
                    value = map_tensors(torch.Tensor.detach, layer(value))
            with torch.no_grad():
                for buffer, saved in saved_buffers:
                    buffer.copy_(saved)
            del layer, saved_buffers  # before the next layer is built
    return costs


def _sum_outputs(output):
    """What a layer that does not end the model backpropagates from: every differentiable output."""
    outputs = [t for t in as_tuple(output) if t.is_floating_point() and t.requires_grad]
    return sum(t.sum() for t in outputs) if outputs else None


def _forward_backward(layer: nn.Module, value, finish) -> None:
    """One forward (then `finish`) and backward; gradients are returned by autograd.grad, not
    accumulated in .grad."""
    inputs = grad_leaf(value)
    total = finish(layer(inputs))
    wrt = ([t for t in as_tuple(inputs) if t.requires_grad]
           + [p for p in layer.parameters() if p.requires_grad])
    if total is not None and total.requires_grad and wrt:
        torch.autograd.grad(total, wrt, allow_unused=True)


def _time_layer(layer: nn.Module, value, finish, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    _forward_backward(layer, value, finish)  # warm-up: allocator, kernel selection, lazy init
    durations = []
    for _ in range(PROFILE_RUNS):
        sync()
        start = time.perf_counter()
        _forward_backward(layer, value, finish)
        sync()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def _memory_layer(layer: nn.Module, value, finish) -> float:
    param_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}  # storage pointer -> bytes: a tensor saved twice (or views of it) counts once

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        finish(layer(grad_leaf(value)))
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    return float(sum(saved.values()) + param_bytes)


def format_cut(balance: Sequence[int], costs: Sequence[float], params_per_layer: Sequence[float],
                by: str, placement: Sequence[int] | None = None) -> str:
    """A table of the cut: stage, its global layers, parameters, cost and share of the total cost;
    with more chunks than stages (interleaved, the V), one row per chunk and the stage that runs it
    (placement[c], PipelineSpec.placement)."""
    total = sum(costs) or 1.0
    placement = placement or range(len(balance))
    chunks = len(set(placement)) != len(balance)
    label = (lambda c: f"{c} (stage {placement[c]})") if chunks else str
    rows = [("chunk" if chunks else "stage", "layers", "params", f"cost ({by})", "share")]
    for s, layer_range in enumerate(stage_ranges(balance)):
        stage_cost = sum(costs[i] for i in layer_range)
        rows.append((label(s), f"{layer_range.start}-{layer_range.stop - 1}",
                     f"{int(sum(params_per_layer[i] for i in layer_range)):,}",
                     f"{stage_cost:.4g}", f"{100 * stage_cost / total:.1f}%"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def _csv(values) -> str:
    return ",".join(str(v) for v in values)
