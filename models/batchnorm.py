"""BatchNorm2d that knows it runs inside a pipeline.

Training normalises each micro-batch with its own statistics (as GPipe does). What happens to the
running statistics is the pipeline's to decide, through minipipe/pipeline/running_stats.py's protocol:
- `frozen`: the re-materialising recompute replays a forward that already updated them once, so
  while it is set nothing is tracked.
- deferred mode (`--deferred-bn`, torchgpipe's DeferredBatchNorm): micro-batches only accumulate
  sum / sum of squares / count; `pending_stats` hands them out once per mini-batch and
  `commit_stats` folds the sums of every replica in, so the running statistics equal those of
  single-device full-batch training.
"""
import torch
from torch import nn

from minipipe.kernels import ops


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
        self._pending = None  # deferred mode: [sum, sum of squares] per channel, and the count

    def forward(self, x):
        if not self.training:
            return ops.batch_norm_eval(x, self.weight, self.bias, self.running_mean,
                                           self.running_var, self.eps, self.relu, self.backend)
        y, mean, var = ops.batch_norm(x, self.weight, self.bias, self.eps, self.relu, self.backend)
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
        ops.update_running_stats(self.running_mean, self.running_var, mean, var_biased, count,
                                     self.momentum)

    def pending_stats(self):
        """Deferred mode: this mini-batch's sums, flat [sum x C, sum of squares x C, count]
        (None when nothing is pending); they leave the layer."""
        if self._pending is None:
            return None
        moments, count = self._pending
        self._pending = None
        return torch.cat([moments.flatten(), count.reshape(1)])

    @torch.no_grad()
    def commit_stats(self, summed):
        """One running-statistics update from `pending_stats` summed over every replica."""
        moments, count = summed[:-1].view(2, -1), summed[-1]
        mean = moments[0] / count
        var = moments[1] / count - mean * mean
        self._update(mean, var, int(count.item()))  # once per step, after the drain
