"""BatchNorm2d that knows it runs inside a pipeline.

Training normalises each micro-batch with its own statistics (as GPipe does). Two engine-facing
switches decide what happens to the running statistics:
- `frozen_running_stats(module)`: the re-materialising recompute replays a forward that already
  updated them once, so inside this context nothing is tracked.
- deferred mode (`--deferred-bn`, torchgpipe's DeferredBatchNorm): micro-batches only accumulate
  sum / sum of squares / count; `commit_deferred_stats` folds them in once per mini-batch, so the
  running statistics equal those of single-device full-batch training.
"""
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

import kernels


class PipelineBatchNorm2d(nn.Module):
    def __init__(self, channels: int, backend: str, deferred: bool, relu: bool = False,
                 momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.backend, self.deferred, self.relu = backend, deferred, relu
        self.momentum, self.eps = momentum, eps
        self.frozen = False
        self._pending = None  # deferred mode: (sum, sum of squares, count) over the mini-batch

    def forward(self, x):
        if not self.training:
            return kernels.batch_norm_eval(x, self.weight, self.bias, self.running_mean,
                                           self.running_var, self.eps, self.relu, self.backend)
        y, mean, var = kernels.batch_norm(x, self.weight, self.bias, self.eps, self.relu, self.backend)
        if not self.frozen:
            self._track(mean.detach(), var.detach(), x.numel() // x.shape[1])
        return y

    @torch.no_grad()
    def _track(self, mean, var, count: int):
        if not self.deferred:
            self._update(mean, var, count)
            return
        moments = torch.stack([mean * count, (var + mean * mean) * count])
        counted = torch.tensor(float(count), dtype=mean.dtype, device=mean.device)
        if self._pending is None:
            self._pending = (moments, counted)
        else:
            self._pending = (self._pending[0] + moments, self._pending[1] + counted)

    @torch.no_grad()
    def _update(self, mean, var_biased, count: int):
        kernels.update_running_stats(self.running_mean, self.running_var, mean, var_biased, count,
                                     self.momentum)

    @torch.no_grad()
    def commit(self, group=None):
        """Deferred mode: one running-statistics update from the whole mini-batch (all replicas)."""
        if self._pending is None:
            return
        moments, count = self._pending
        self._pending = None
        if group is not None and dist.get_world_size(group) > 1:
            packed = torch.cat([moments.flatten(), count.reshape(1)])
            dist.all_reduce(packed, group=group)
            moments, count = packed[:-1].view_as(moments), packed[-1]
        mean = moments[0] / count
        var = moments[1] / count - mean * mean
        self._update(mean, var, int(count.item()))


@contextmanager
def frozen_running_stats(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, PipelineBatchNorm2d)]
    for norm in norms:
        norm.frozen = True
    try:
        yield
    finally:
        for norm in norms:
            norm.frozen = False


def commit_deferred_stats(module: nn.Module, group=None) -> None:
    for norm in module.modules():
        if isinstance(norm, PipelineBatchNorm2d):
            norm.commit(group)
