"""RMSNorm over the last dim (Llama's): y = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps).

One program per row forward (statistics in fp32 whatever the storage; the normalised row is
rounded to the input's dtype before the weight multiplies it, as transformers' LlamaRMSNorm
does); backward gives dx per row and reduces dw through per-program partial sums (one program
per SM, summed by torch) instead of atomics, so the result is deterministic."""
import torch

from minipipe.kernels.runtime import empty, sm_count, tl, triton

# As layernorm.MAX_HIDDEN: the backward keeps x, dy and dw of a row live in registers.
MAX_HIDDEN = 8192


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(x_ptr, w_ptr, dy_ptr, dx_ptr, rstd_ptr, dw_part_ptr, stride_x, stride_dy,
                  stride_dx, n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = row_start + i
        # The last program's stripe may run past the end: such rows see no columns.
        row_mask = cols < tl.where(row < n_rows, n_cols, 0)
        x = tl.load(x_ptr + row * stride_x + cols, mask=row_mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=row_mask, other=0.0).to(tl.float32)
        # Clamped rather than masked (the interpreter rejects scalar masks); x, dy are 0 there.
        rstd = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))
        xhat = x * rstd
        wdy = w * dy
        # d/dx of x * rstd(x): the component along x is projected out through rstd's derivative.
        dx = (wdy - xhat * (tl.sum(xhat * wdy, axis=0) / n_cols)) * rstd
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
        dw += dy * xhat
    tl.store(dw_part_ptr + pid * n_cols + cols, dw, mask=mask)


def _launch_config(n_cols: int):
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm kernel supports hidden sizes up to {MAX_HIDDEN}, got {n_cols}: "
                         "use backend 'torch'")
    block = triton.next_power_of_2(n_cols)
    num_warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_forward(x, weight, eps):
    rows = _rows(x)
    n_rows, n_cols = rows.shape
    block, num_warps = _launch_config(n_cols)
    y = empty(rows.shape, x.dtype, x.device)
    rstd = empty((n_rows,), torch.float32, x.device)
    _rms_norm_fwd[(n_rows,)](rows, weight, y, rstd, rows.stride(0), y.stride(0), n_cols, eps,
                             BLOCK=block, num_warps=num_warps)
    return y.view(x.shape), rstd


def rms_norm_backward(dy, x, weight, rstd):
    rows, dy_rows = _rows(x), _rows(dy)
    n_rows, n_cols = rows.shape
    block, num_warps = _launch_config(n_cols)
    n_programs = min(n_rows, sm_count(x.device))
    rows_per_program = triton.cdiv(n_rows, n_programs)
    dx = empty(rows.shape, x.dtype, x.device)
    dw_part = empty((n_programs, n_cols), torch.float32, x.device)
    _rms_norm_bwd[(n_programs,)](rows, weight, dy_rows, dx, rstd, dw_part, rows.stride(0),
                                 dy_rows.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
                                 BLOCK=block, num_warps=num_warps)
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd)
        return dx, dw, None


def rms_norm_reference(x, weight, eps):
    """transformers' LlamaRMSNorm written out: statistics in at least fp32, the normalised row in
    x's dtype."""
    wide = x if x.element_size() >= 4 else x.float()
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
