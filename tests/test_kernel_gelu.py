import pytest
import torch

from minipipe.kernels import ops
from minipipe.kernels.gelu import bias_gelu_reference
from minipipe.kernels.testing import DEVICE, DTYPES, GPU_ONLY, check_against_reference

# The interpreter (numpy) warns when exp overflows to inf in a saturated sigmoid; the result is exact.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _run(shape, dtype, approximate, with_bias):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], device=DEVICE).to(dtype).requires_grad_() if with_bias else None
    check_against_reference(
        lambda x, b: ops.bias_gelu(x, b, approximate, backend="triton"),
        lambda x, b: bias_gelu_reference(x, b, approximate),
        [x, bias], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 129), (2, 1500)])
def test_bias_gelu_matches_reference(shape, approximate, dtype):
    _run(shape, dtype, approximate, with_bias=True)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_without_bias_matches_reference(approximate):
    _run((4, 33), torch.float32, approximate, with_bias=False)


def test_gelu_far_tails_stay_finite():
    """Large |x| saturates the sigmoid / erf: outputs must be x or 0, never NaN."""
    x = torch.tensor([[-60.0, -10.0, 10.0, 60.0]], device=DEVICE, requires_grad=True)
    for approximate in ("tanh", "none"):
        check_against_reference(lambda t: ops.bias_gelu(t, None, approximate, "triton"),
                                lambda t: bias_gelu_reference(t, None, approximate),
                                [x], torch.float32)


@GPU_ONLY
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_bias_gelu_matches_reference_bf16(approximate):
    _run((3, 7, 129), torch.bfloat16, approximate, with_bias=True)


def test_bias_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="tanh"):
        ops.bias_gelu(torch.randn(2, 3), None, "sigmoid", backend="torch")
