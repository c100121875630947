"""Softmax cross-entropy over the vocabulary without materialising the softmax.

One program per token row makes two passes over its logits: an online max / sum-of-exp for the
logsumexp, then (when a gradient is wanted) softmax - onehot scaled for the reduction, written
straight away. The forward pass therefore produces the gradient (as Liger-Kernel does) and the
backward only scales it by the incoming scalar. 'mean' divides by the number of counted tokens,
read from a device tensor so no host sync is needed.

`LinearCrossEntropyFunction` fuses the final linear layer: tokens go through in chunks, each
chunk's logits buffer is overwritten in place by its gradient and immediately folded into the
hidden/weight/bias gradients, so the (N, V) logits never exist whole."""
import torch
import torch.nn.functional as F

from minipipe.kernels.runtime import empty, tl, triton

REDUCTIONS = ("mean", "sum")
MAX_BLOCK_V = 8192


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross-entropy reduction must be one of {REDUCTIONS}, got {reduction!r}")


@triton.jit
def _cross_entropy_kernel(logits_ptr, grad_ptr, targets_ptr, loss_ptr, n_counted_ptr,
                          stride_logits, stride_grad, n_classes, ignore_index,
                          MEAN: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_logits
    target = tl.load(targets_ptr + row)
    counted = target != ignore_index
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, n_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_logits + cols, mask=cols < n_classes, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    # The target logit as a masked one-element block load (the interpreter rejects scalar masks).
    valid = counted & (target >= 0) & (target < n_classes)
    # A name carried through a loop keeps one block shape: `cols` is BLOCK_V wide in both loops.
    pair = tl.arange(0, 2)
    hit = pair < tl.where(valid, 1, 0)
    target_logit = tl.sum(tl.load(row_logits + target + pair, mask=hit, other=0.0).to(tl.float32), axis=0)
    tl.store(loss_ptr + row, tl.where(counted, lse - target_logit, 0.0))
    if WITH_GRAD:
        scale = tl.where(counted, 1.0, 0.0)
        if MEAN:
            scale = scale / tl.load(n_counted_ptr)
        row_grad = grad_ptr + row * stride_grad
        for start in range(0, n_classes, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_classes
            x = tl.load(row_logits + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(row_grad + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _count(targets, ignore_index, reduction):
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=targets.device)
    return (targets != ignore_index).sum().to(torch.float32)


def _launch(logits, grad, targets, loss_rows, n_counted, ignore_index, reduction):
    """Per-row losses into loss_rows; the scaled gradient into grad (may be logits itself)."""
    n_rows, n_classes = logits.shape
    block = min(MAX_BLOCK_V, triton.next_power_of_2(n_classes))
    _cross_entropy_kernel[(n_rows,)](
        logits, logits if grad is None else grad, targets, loss_rows, n_counted,
        logits.stride(0), 0 if grad is None else grad.stride(0), n_classes, ignore_index,
        MEAN=reduction == "mean", WITH_GRAD=grad is not None, BLOCK_V=block,
        num_warps=16 if block >= 4096 else 8)


def _rows(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _reduce(loss_rows, n_counted, reduction):
    total = loss_rows.sum()
    return total / n_counted if reduction == "mean" else total


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction):
        logits, targets = _rows(logits), targets.contiguous()
        n_counted = _count(targets, ignore_index, reduction)
        grad = empty(logits.shape, logits.dtype, logits.device) if ctx.needs_input_grad[0] else None
        loss_rows = empty((logits.shape[0],), torch.float32, logits.device)
        _launch(logits, grad, targets, loss_rows, n_counted, ignore_index, reduction)
        # Scaled in place by backward: a second backward through this graph raises torch's
        # "modified by an inplace operation" instead of returning a twice-scaled gradient.
        ctx.save_for_backward(grad)
        return _reduce(loss_rows, n_counted, reduction).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None


def default_chunk_size(n_tokens: int, hidden: int, n_classes: int) -> int:
    """Liger-Kernel's choice: a chunk's logits about as large as the hidden states."""
    return triton.next_power_of_2(triton.cdiv(n_tokens, triton.cdiv(n_classes, hidden)))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, chunk_size):
        n_tokens, dim = hidden.shape
        targets = targets.contiguous()
        chunk_size = chunk_size or default_chunk_size(n_tokens, dim, weight.shape[0])
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        with_grad = want_hidden or want_weight or want_bias
        n_counted = _count(targets, ignore_index, reduction)
        loss_rows = empty((n_tokens,), torch.float32, hidden.device)
        grad_hidden = empty(hidden.shape, hidden.dtype, hidden.device) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = (torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device)
                     if want_bias else None)
        for start in range(0, n_tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = hidden[rows]
            logits = F.linear(chunk, weight, bias)
            _launch(logits, logits if with_grad else None, targets[rows], loss_rows[rows],
                    n_counted, ignore_index, reduction)
            if want_hidden:
                torch.mm(logits, weight, out=grad_hidden[rows])
            if want_weight:
                grad_weight.addmm_(logits.t(), chunk)
            if want_bias:
                grad_bias += logits.sum(0, dtype=torch.float32)
        if want_bias:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return _reduce(loss_rows, n_counted, reduction).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors)
        return *grads, None, None, None, None


def cross_entropy_reference(logits, targets, ignore_index, reduction):
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy_reference(hidden, weight, bias, targets, ignore_index, reduction):
    return cross_entropy_reference(F.linear(hidden, weight, bias), targets, ignore_index, reduction)
