import pytest
import torch

from minipipe.kernels import ops
from minipipe.kernels.batchnorm import batch_norm_eval_reference, batch_norm_reference, update_running_stats
from minipipe.kernels.testing import DEVICE, DTYPES, GPU_ONLY, check_against_reference

SHAPES = [(1, 3, 2, 3), (2, 5, 7, 9), (3, 2, 33, 35), (5, 6)]


def _inputs(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype).requires_grad_()
    weight = torch.randn(shape[1], device=DEVICE).requires_grad_()
    bias = torch.randn(shape[1], device=DEVICE).requires_grad_()
    return x, weight, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_training_batch_norm_matches_reference(shape, relu, dtype):
    check_against_reference(
        lambda *a: ops.batch_norm(*a, eps=1e-5, relu=relu, backend="triton"),
        lambda *a: batch_norm_reference(*a, eps=1e-5, relu=relu),
        list(_inputs(shape, dtype)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_batch_norm_matches_reference(shape, relu, dtype):
    x, weight, bias = _inputs(shape, dtype)
    running_mean = torch.randn(shape[1], device=DEVICE)
    running_var = torch.rand(shape[1], device=DEVICE) + 0.5
    check_against_reference(
        lambda x, w, b, m, v: ops.batch_norm_eval(x, w, b, m, v, 1e-5, relu, "triton"),
        lambda x, w, b, m, v: batch_norm_eval_reference(x, w, b, m, v, 1e-5, relu),
        [x, weight, bias, running_mean, running_var], dtype)


@GPU_ONLY
@pytest.mark.parametrize("relu", [False, True])
def test_training_batch_norm_matches_reference_bf16(relu):
    check_against_reference(
        lambda *a: ops.batch_norm(*a, eps=1e-5, relu=relu, backend="triton"),
        lambda *a: batch_norm_reference(*a, eps=1e-5, relu=relu),
        list(_inputs((3, 2, 33, 35), torch.bfloat16)), torch.bfloat16)


def test_running_stats_update_matches_torch_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    module = torch.nn.BatchNorm2d(3, momentum=0.3).double().train()
    module(x)
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    _, mean, var = ops.batch_norm(x, module.weight, module.bias, 1e-5, False, "torch")
    update_running_stats(running_mean, running_var, mean, var, count=4 * 5 * 5, momentum=0.3)
    torch.testing.assert_close(running_mean, module.running_mean)
    torch.testing.assert_close(running_var, module.running_var)
