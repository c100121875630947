"""Rotary position embedding (RoPE, Su et al. 2021) of q and k in the rotate-half layout of
Llama: the pair a frequency rotates is (x[j], x[j + D/2]), so x -> x * cos + rotate_half(x) * sin
with rotate_half(x) = (-x[D/2:], x[:D/2]) and cos, sin (T, D) repeating their D/2 angles in both
halves (as models/llama.py's rotary_cos_sin makes them; the kernel reads the first half).

One program per (batch, head, position) row: it loads the row's two halves and rotates them in
fp32. The backward is the rotation by the opposite angle (a rotation's transpose), the same
kernel with sin negated. Any even head dim; q and k may be strided views (the last dim dense)."""
import torch

from minipipe.kernels.runtime import empty, tl, triton


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, T, stride_b, stride_h, stride_t, half,
                 stride_cos, sign, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * T + t
    t = row % T
    h = (row // T) % H
    b = row // (T * H)
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    x_row = x_ptr + b * stride_b + h * stride_h + t * stride_t
    x1 = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + cols, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * stride_cos + cols, mask=mask, other=0.0).to(tl.float32)
    s = sign * tl.load(sin_ptr + t * stride_cos + cols, mask=mask, other=0.0).to(tl.float32)
    y_row = y_ptr + row * 2 * half
    tl.store(y_row + cols, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + half + cols, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


def rotate(x, cos, sin, sign: float):
    """x (B, H, T, D) rotated by sign * angle; a new contiguous tensor."""
    B, H, T, D = x.shape
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {D}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = empty(x.shape, x.dtype, x.device)
    half = D // 2
    block = triton.next_power_of_2(half)
    _rope_kernel[(B * H * T,)](x, cos, sin, y, H, T, x.stride(0), x.stride(1), x.stride(2), half,
                               cos.stride(0), sign, BLOCK=block, num_warps=1 if block <= 64 else 4)
    return y


class RotaryEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(q, cos, sin, 1.0), rotate(k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return rotate(dq, cos, sin, -1.0), rotate(dk, cos, sin, -1.0), None, None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_reference(x, cos, sin):
    """x (..., T, D) rotated by position: x * cos + rotate_half(x) * sin."""
    return x * cos + rotate_half(x) * sin
