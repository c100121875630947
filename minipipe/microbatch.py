"""Split a batch (Tensor or tuple of Tensors) into micro-batches along dim 0, and join them."""
import torch


def split(value, n_microbatches: int) -> list:
    """M micro-batches; sizes differ by at most one when the batch does not divide evenly."""
    if isinstance(value, torch.Tensor):
        return list(torch.tensor_split(value, n_microbatches))
    parts = [torch.tensor_split(t, n_microbatches) for t in value]
    return [tuple(p[m] for p in parts) for m in range(n_microbatches)]


def batch_size(value) -> int:
    return (value if isinstance(value, torch.Tensor) else value[0]).shape[0]


def as_tuple(value) -> tuple:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)
