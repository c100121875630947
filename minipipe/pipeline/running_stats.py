"""The pipeline's half of layers that keep running statistics (BatchNorm), through a protocol:
the engine and the recompute never import model code.

A layer takes part by having
    frozen: bool                      while True, forwards leave the running statistics alone
    pending_stats() -> Tensor | None  deferred mode: this mini-batch's flat sums (moments, count)
    commit_stats(summed: Tensor)      fold those sums (over every replica) into the statistics
models/batchnorm.py's PipelineBatchNorm2d is the one implementation.

- The re-materialising recompute replays a forward that already updated the statistics once:
  it runs under `frozen(stage)`.
- Deferred statistics (`--deferred-bn`): every layer's pending sums travel in ONE flat all-reduce
  over the dp replicas, then each layer commits its slice.
- Per-micro-batch statistics with dp > 1: replicas saw different rows, so their running
  statistics are averaged, again in one flat all-reduce of every buffer.
"""
from contextlib import contextmanager
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class RunningStats(Protocol):
    frozen: bool

    def pending_stats(self) -> torch.Tensor | None: ...

    def commit_stats(self, summed: torch.Tensor) -> None: ...


def stats_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, RunningStats)]


@contextmanager
def frozen(module: nn.Module):
    layers = stats_layers(module)
    for layer in layers:
        layer.frozen = True
    try:
        yield
    finally:
        for layer in layers:
            layer.frozen = False


def commit_deferred(layers: list, all_reduce: Callable[[torch.Tensor], None] | None) -> None:
    """One collective for every layer's pending sums (all_reduce sums in place; None: one replica)."""
    pending = [(layer, layer.pending_stats()) for layer in layers]
    pending = [(layer, sums) for layer, sums in pending if sums is not None]
    if not pending:
        return
    flat = torch.cat([sums for _, sums in pending])
    if all_reduce is not None:
        all_reduce(flat)
    for (layer, sums), summed in zip(pending, flat.split([s.numel() for _, s in pending])):
        layer.commit_stats(summed)


@torch.no_grad()
def average_buffers(module: nn.Module, all_reduce: Callable[[torch.Tensor], None], replicas: int) -> None:
    """Every floating buffer of `module` becomes its mean over the replicas, in one collective."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch._utils._flatten_dense_tensors(buffers)
    all_reduce(flat)
    flat.div_(replicas)
    for buffer, mean in zip(buffers, torch._utils._unflatten_dense_tensors(flat, buffers)):
        buffer.copy_(mean)
