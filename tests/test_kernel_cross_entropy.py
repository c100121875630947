import pytest
import torch

from minipipe.kernels import ops
from minipipe.kernels.fused_cross_entropy import cross_entropy_reference, linear_cross_entropy_reference
from minipipe.kernels.testing import DEVICE, DTYPES, GPU_ONLY, check_against_reference

IGNORE = -100
# (N tokens, V classes): a single row, a vocab below one block, a vocab over several blocks.
SHAPES = [(1, 7), (37, 1000), (5, 20000)]


def _targets(n, n_classes):
    targets = torch.randint(0, n_classes, (n,), device=DEVICE)
    targets[1::3] = IGNORE
    return targets


def _run_cross_entropy(shape, reduction, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    check_against_reference(
        lambda x, t: ops.cross_entropy(x, t, IGNORE, reduction, backend="triton"),
        lambda x, t: cross_entropy_reference(x, t, IGNORE, reduction),
        [logits, _targets(*shape)], dtype)


def _run_linear_cross_entropy(shape, reduction, dtype, with_bias, chunk_size):
    torch.manual_seed(0)
    n, n_classes = shape
    hidden = torch.randn(n, 24, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(n_classes, 24, device=DEVICE) * 0.3).to(dtype).requires_grad_()
    bias = torch.randn(n_classes, device=DEVICE).to(dtype).requires_grad_() if with_bias else None
    check_against_reference(
        lambda h, w, b, t: ops.linear_cross_entropy(h, w, b, t, IGNORE, reduction,
                                                        backend="triton", chunk_size=chunk_size),
        lambda h, w, b, t: linear_cross_entropy_reference(h, w, b, t, IGNORE, reduction),
        [hidden, weight, bias, _targets(n, n_classes)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_matches_reference(shape, reduction, dtype):
    _run_cross_entropy(shape, reduction, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_cross_entropy_matches_reference_in_uneven_chunks(shape, reduction, dtype):
    _run_linear_cross_entropy(shape, reduction, dtype, with_bias=True, chunk_size=4)


def test_linear_cross_entropy_default_chunks_without_bias():
    _run_linear_cross_entropy((37, 1000), "mean", torch.float32, with_bias=False, chunk_size=None)


def test_cross_entropy_gradient_only_on_request():
    """Without requires_grad the kernel skips the gradient pass and stores nothing."""
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 50, device=DEVICE), _targets(6, 50)
    loss = ops.cross_entropy(logits, targets, IGNORE, "mean", backend="triton")
    torch.testing.assert_close(loss, cross_entropy_reference(logits, targets, IGNORE, "mean"))
    assert not loss.requires_grad


def test_cross_entropy_refuses_second_backward_through_same_graph():
    logits = torch.randn(3, 10, device=DEVICE, requires_grad=True)
    loss = ops.cross_entropy(logits, _targets(3, 10), IGNORE, "sum", backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@GPU_ONLY
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_reference_bf16(reduction):
    _run_cross_entropy((37, 1000), reduction, torch.bfloat16)
    _run_linear_cross_entropy((37, 1000), reduction, torch.bfloat16, with_bias=True, chunk_size=16)


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="none",
                              backend="torch")
