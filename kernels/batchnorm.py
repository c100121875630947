"""Training- and eval-mode BatchNorm over channel dim 1 of (N, C, *) inputs, with optional fused
ReLU. Running statistics are the caller's business: training returns the batch mean and biased
variance (fp32) so a deferred BatchNorm can accumulate them across micro-batches, and
`update_running_stats` folds them in the way torch does.

Kernels: per-channel two-pass statistics (mean, then centred sum of squares: no cancellation),
a normalise pass over (channel, block) programs; backward reduces sum(dy) and sum(dy * xhat) per
channel (these are db and dw) and then writes dx. The ReLU mask is recomputed from x, not saved."""
import torch

from minipipe.kernels.runtime import empty, tl, triton

BLOCK = 1024


@triton.jit
def _offsets(channel, r, n_channels, inner):
    """Flat offsets of the r-th element of `channel` in a contiguous (N, C, inner) tensor."""
    return (r // inner) * n_channels * inner + channel * inner + r % inner


@triton.jit
def _bn_stats(x_ptr, mean_ptr, var_ptr, n_channels, inner, count, BLOCK: tl.constexpr):
    channel = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        r = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = r < count
        x = tl.load(x_ptr + _offsets(channel, r, n_channels, inner), mask=mask, other=0.0)
        total += x.to(tl.float32)
    mean = tl.sum(total, axis=0) / count
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        r = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = r < count
        x = tl.load(x_ptr + _offsets(channel, r, n_channels, inner), mask=mask, other=0.0).to(tl.float32)
        squares += tl.where(mask, (x - mean) * (x - mean), 0.0)
    tl.store(mean_ptr + channel, mean)
    tl.store(var_ptr + channel, tl.sum(squares, axis=0) / count)


@triton.jit
def _load_normalised(x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, channel, r, mask, n_channels, inner,
                     eps):
    """Returns offsets, xhat, the pre-activation xhat * w + b, w and rstd for one block."""
    offsets = _offsets(channel, r, n_channels, inner)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.load(var_ptr + channel).to(tl.float32) + eps)
    xhat = (x - tl.load(mean_ptr + channel).to(tl.float32)) * rstd
    w = tl.load(w_ptr + channel).to(tl.float32)
    return offsets, xhat, xhat * w + tl.load(b_ptr + channel).to(tl.float32), w, rstd


@triton.jit
def _bn_normalise(x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, y_ptr, n_channels, inner, count, eps,
                  RELU: tl.constexpr, BLOCK: tl.constexpr):
    channel = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < count
    offsets, _, y, _, _ = _load_normalised(x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, channel, r, mask,
                                           n_channels, inner, eps)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_reduce(x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, dy_ptr, dw_ptr, db_ptr, n_channels,
                   inner, count, eps, RELU: tl.constexpr, BLOCK: tl.constexpr):
    channel = tl.program_id(0).to(tl.int64)
    sum_dy = tl.zeros([BLOCK], dtype=tl.float32)
    sum_dy_xhat = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        r = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = r < count
        offsets, xhat, y, _, _ = _load_normalised(x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, channel,
                                                  r, mask, n_channels, inner, eps)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            dy = tl.where(y > 0.0, dy, 0.0)
        sum_dy += dy
        sum_dy_xhat += dy * xhat
    tl.store(dw_ptr + channel, tl.sum(sum_dy_xhat, axis=0))
    tl.store(db_ptr + channel, tl.sum(sum_dy, axis=0))


@triton.jit
def _bn_bwd_dx(x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, dy_ptr, dw_ptr, db_ptr, dx_ptr, n_channels,
               inner, count, eps, RELU: tl.constexpr, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    channel = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < count
    offsets, xhat, y, w, rstd = _load_normalised(x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, channel, r,
                                                 mask, n_channels, inner, eps)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        dy = tl.where(y > 0.0, dy, 0.0)
    if TRAINING:
        # Batch statistics depend on x too: remove the mean and the xhat direction of dy.
        dy -= (tl.load(db_ptr + channel) + xhat * tl.load(dw_ptr + channel)) / count
    tl.store(dx_ptr + offsets, (dy * w * rstd).to(dx_ptr.dtype.element_ty), mask=mask)


# Elementwise passes run on a (block of the channel's elements, channel) grid: CUDA allows 2^31 - 1
# blocks on axis 0 and 65535 on axis 1, and a channel's N*H*W elements outgrow 65535 blocks first.
MAX_CHANNELS = 65535


def _geometry(x):
    n_channels = x.shape[1]
    if n_channels > MAX_CHANNELS:
        raise ValueError(f"batch_norm kernel supports up to {MAX_CHANNELS} channels, got "
                         f"{n_channels}: use backend 'torch'")
    inner = x[0, 0].numel()
    return n_channels, inner, x.numel() // n_channels


def _normalise(x, weight, bias, mean, var, eps, relu):
    n_channels, inner, count = _geometry(x)
    y = empty(x.shape, x.dtype, x.device)
    _bn_normalise[(triton.cdiv(count, BLOCK), n_channels)](
        x, weight, bias, mean, var, y, n_channels, inner, count, eps, RELU=relu, BLOCK=BLOCK)
    return y


def _backward(dy, x, weight, bias, mean, var, eps, relu, training):
    n_channels, inner, count = _geometry(x)
    dy = dy.contiguous()
    dw = empty((n_channels,), torch.float32, x.device)
    db = empty((n_channels,), torch.float32, x.device)
    args = (x, weight, bias, mean, var, dy, dw, db)
    _bn_bwd_reduce[(n_channels,)](*args, n_channels, inner, count, eps, RELU=relu, BLOCK=BLOCK)
    dx = empty(x.shape, x.dtype, x.device)
    _bn_bwd_dx[(triton.cdiv(count, BLOCK), n_channels)](
        *args, dx, n_channels, inner, count, eps, RELU=relu, TRAINING=training, BLOCK=BLOCK)
    return dx, dw.to(weight.dtype), db.to(bias.dtype)


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu):
        x = x.contiguous()
        n_channels, inner, count = _geometry(x)
        mean = empty((n_channels,), torch.float32, x.device)
        var = empty((n_channels,), torch.float32, x.device)
        _bn_stats[(n_channels,)](x, mean, var, n_channels, inner, count, BLOCK=BLOCK)
        y = _normalise(x, weight, bias, mean, var, eps, relu)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.eps, ctx.relu = eps, relu
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        dx, dw, db = _backward(dy, *ctx.saved_tensors, ctx.eps, ctx.relu, training=True)
        return dx, dw, db, None, None


class BatchNormEvalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, relu):
        x = x.contiguous()
        ctx.save_for_backward(x, weight, bias, running_mean, running_var)
        ctx.eps, ctx.relu = eps, relu
        return _normalise(x, weight, bias, running_mean, running_var, eps, relu)

    @staticmethod
    def backward(ctx, dy):
        dx, dw, db = _backward(dy, *ctx.saved_tensors, ctx.eps, ctx.relu, training=False)
        return dx, dw, db, None, None, None, None


def _affine(x, weight, bias, mean, var, eps, relu):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)
    return torch.relu(y) if relu else y


def batch_norm_reference(x, weight, bias, eps, relu):
    """Returns (y, batch_mean, batch_var_biased); statistics in at least fp32."""
    stats_input = x.float() if x.element_size() < 4 else x
    dims = [0] + list(range(2, x.dim()))
    mean = stats_input.mean(dims)
    var = stats_input.var(dims, unbiased=False)
    y = _affine(stats_input, weight, bias, mean, var, eps, relu).to(x.dtype)
    return y, mean.detach(), var.detach()


def batch_norm_eval_reference(x, weight, bias, running_mean, running_var, eps, relu):
    return _affine(x, weight, bias, running_mean, running_var, eps, relu).to(x.dtype)


@torch.no_grad()
def update_running_stats(running_mean, running_var, batch_mean, batch_var_biased, count: int,
                         momentum: float) -> None:
    """torch.nn.BatchNorm's update: an exponential moving average of the mean and of the unbiased
    (Bessel-corrected over `count` elements per channel) variance."""
    unbiased = batch_var_biased * (count / max(count - 1, 1))
    running_mean.lerp_(batch_mean.to(running_mean.dtype), momentum)
    running_var.lerp_(unbiased.to(running_var.dtype), momentum)
