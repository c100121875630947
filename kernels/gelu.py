"""gelu(x + bias), tanh approximation or exact, as one elementwise pass each way.

The backward recomputes x + bias from the saved inputs instead of saving the pre-activation.
tanh is rewritten through the sigmoid, 0.5 * (1 + tanh(u)) = sigmoid(2u), because libdevice tanh
does not run in the interpreter; tl.erf (core math, not libdevice) runs everywhere."""
import math

import torch
import torch.nn.functional as F

from minipipe.kernels.runtime import autotune_configs, empty, tl, triton

APPROXIMATIONS = ("tanh", "none")
# A compiled kernel may read a module global only if it is a tl.constexpr (the interpreter reads any).
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2 / math.pi))
INV_SQRT_2 = tl.constexpr(1 / math.sqrt(2))
INV_SQRT_2PI = tl.constexpr(1 / math.sqrt(2 * math.pi))
TANH_CUBIC = tl.constexpr(0.044715)


def check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"bias_gelu approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


@triton.jit
def _gelu_and_slope(x, APPROX_TANH: tl.constexpr):
    """Returns gelu(x) and d gelu / dx, in fp32."""
    if APPROX_TANH:
        u = SQRT_2_OVER_PI * (x + TANH_CUBIC * x * x * x)
        s = tl.sigmoid(2.0 * u)
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * x * x)
        return x * s, s + x * 2.0 * s * (1.0 - s) * du
    else:
        cdf = 0.5 * (1.0 + tl.erf(x * INV_SQRT_2))
        pdf = tl.exp(-0.5 * x * x) * INV_SQRT_2PI
        return x * cdf, cdf + x * pdf


_CONFIGS = autotune_configs([triton.Config({"BLOCK": b}, num_warps=w)
                             for b, w in ((1024, 4), (2048, 8), (4096, 8))],
                            triton.Config({"BLOCK": 1024}))


@triton.autotune(configs=_CONFIGS, key=["n_elements"])
@triton.jit
def _bias_gelu_kernel(x_ptr, bias_ptr, dy_ptr, out_ptr, n_elements, n_cols,
                      HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, BACKWARD: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Forward writes gelu(x + bias); backward writes dy * gelu'(x + bias)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offsets % n_cols, mask=mask, other=0.0).to(tl.float32)
    y, slope = _gelu_and_slope(x, APPROX_TANH)
    if BACKWARD:
        y = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * slope
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, bias, dy, approximate):
    out = empty(x.shape, x.dtype, x.device)
    n = x.numel()
    # Absent bias / dy: x stands in as a pointer the kernel never reads (HAS_BIAS / BACKWARD).
    _bias_gelu_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
        x, x if bias is None else bias, x if dy is None else dy, out, n, x.shape[-1],
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", BACKWARD=dy is not None)
    return out


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        x = x.contiguous()
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        return _launch(x, bias, None, approximate)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx = _launch(x, bias, dy.contiguous(), ctx.approximate)
        dbias = None
        if bias is not None and ctx.needs_input_grad[1]:
            dbias = dx.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
        return dx, dbias, None


def bias_gelu_reference(x, bias, approximate):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)
