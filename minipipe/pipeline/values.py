"""A value: what a layer takes and returns, and what crosses a stage boundary, is a Tensor or a
tuple of Tensors (the layer contract). Every "Tensor or tuple" question is answered here."""
import torch


def as_tuple(value) -> tuple:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def map_tensors(fn, value, floating_only: bool = False):
    """fn applied to a Tensor, or to each entry of a tuple (the structure is kept). floating_only:
    a tuple keeps only its floating entries (those that carry a gradient back)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    return tuple(fn(t) for t in value if t.is_floating_point() or not floating_only)


def batch_size(value) -> int:
    return as_tuple(value)[0].shape[0]


def split(value, n_microbatches: int) -> list:
    """M micro-batches along dim 0; sizes differ by at most one when the batch does not divide
    evenly."""
    if isinstance(value, torch.Tensor):
        return list(torch.tensor_split(value, n_microbatches))
    parts = [torch.tensor_split(t, n_microbatches) for t in value]
    return [tuple(p[m] for p in parts) for m in range(n_microbatches)]


def grad_spec(value):
    """Shape and dtype of the gradient expected back for a sent value: its floating entries,
    with the same structure (Tensor or tuple), as meta tensors that hold no memory."""
    return map_tensors(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), value,
                       floating_only=True)


def input_grads(leaf):
    """The gradient a chunk sends back: one per floating input entry, structured like the input."""
    return map_tensors(lambda t: t.grad if t.grad is not None else torch.zeros_like(t), leaf,
                       floating_only=True)


def detached(value):
    return map_tensors(torch.Tensor.detach, value)
