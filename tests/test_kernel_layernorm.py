import pytest
import torch

from minipipe.kernels import layernorm, ops
from minipipe.kernels.testing import DEVICE, DTYPES, GPU_ONLY, check_against_reference


def _run(shape, dtype):
    torch.manual_seed(0)
    n = shape[-1]
    x = (torch.randn(shape, device=DEVICE) * 3 + 1).to(dtype).requires_grad_()
    weight = torch.randn(n, device=DEVICE).requires_grad_()
    bias = torch.randn(n, device=DEVICE).requires_grad_()
    check_against_reference(
        lambda *a: ops.layer_norm(*a, eps=1e-5, backend="triton"),
        lambda *a: layernorm.layer_norm_reference(*a, eps=1e-5),
        [x, weight, bias], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 33), (37, 1000), (2, 3000)])
def test_layer_norm_matches_reference(shape, dtype):
    _run(shape, dtype)


def test_layer_norm_handles_largest_hidden_size():
    _run((3, layernorm.MAX_HIDDEN), torch.float32)


@GPU_ONLY
@pytest.mark.parametrize("shape", [(37, 1000), (5, layernorm.MAX_HIDDEN)])
def test_layer_norm_matches_reference_bf16(shape):
    _run(shape, torch.bfloat16)


def test_layer_norm_rejects_oversized_hidden():
    with pytest.raises(ValueError, match="up to"):
        ops.layer_norm(torch.randn(2, layernorm.MAX_HIDDEN + 1, device=DEVICE),
                           torch.ones(layernorm.MAX_HIDDEN + 1, device=DEVICE),
                           torch.zeros(layernorm.MAX_HIDDEN + 1, device=DEVICE), 1e-5, "triton")
