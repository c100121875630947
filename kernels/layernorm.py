"""LayerNorm over the last dim: one program per row forward; backward gives dx per row and reduces
dw/db through per-program partial sums (one program per SM, summed by torch) instead of atomics,
so the result is deterministic. Statistics are fp32 whatever the storage dtype."""
import torch
import torch.nn.functional as F

from minipipe.kernels.runtime import empty, sm_count, tl, triton

# 8192, not more: the backward keeps dw, db, x and dy of a row live, four row-wide fp32 blocks,
# which at 16384 columns is the whole register file of an SM (compile report: spills)
MAX_HIDDEN = 8192


@triton.jit
def _layer_norm_fwd(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, stride_x, stride_y, n_cols,
                    eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * w + b
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd(x_ptr, w_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, dw_part_ptr, db_part_ptr,
                    stride_x, stride_dy, stride_dx, n_rows, n_cols, rows_per_program,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = row_start + i
        # The last program's stripe may run past the end: such rows see no columns.
        row_mask = cols < tl.where(row < n_rows, n_cols, 0)
        x = tl.load(x_ptr + row * stride_x + cols, mask=row_mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=row_mask, other=0.0).to(tl.float32)
        # Clamped rather than masked (the interpreter rejects scalar masks); x, dy are 0 there.
        mean = tl.load(mean_ptr + tl.minimum(row, n_rows - 1))
        rstd = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        # d/dx of (x - mean) * rstd projected out: the mean and the variance directions.
        c1 = tl.sum(xhat * wdy, axis=0) / n_cols
        c2 = tl.sum(wdy, axis=0) / n_cols
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
        dw += dy * xhat
        db += dy
    tl.store(dw_part_ptr + pid * n_cols + cols, dw, mask=mask)
    tl.store(db_part_ptr + pid * n_cols + cols, db, mask=mask)


def _launch_config(n_cols: int):
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"layer_norm kernel supports hidden sizes up to {MAX_HIDDEN}, got {n_cols}: "
                         "use backend 'torch'")
    block = triton.next_power_of_2(n_cols)
    num_warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def layer_norm_forward(x, weight, bias, eps):
    rows = _rows(x)
    n_rows, n_cols = rows.shape
    block, num_warps = _launch_config(n_cols)
    y = empty(rows.shape, x.dtype, x.device)
    mean = empty((n_rows,), torch.float32, x.device)
    rstd = empty((n_rows,), torch.float32, x.device)
    _layer_norm_fwd[(n_rows,)](rows, weight, bias, y, mean, rstd, rows.stride(0), y.stride(0),
                               n_cols, eps, BLOCK=block, num_warps=num_warps)
    return y.view(x.shape), mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd):
    rows, dy_rows = _rows(x), _rows(dy)
    n_rows, n_cols = rows.shape
    block, num_warps = _launch_config(n_cols)
    n_programs = min(n_rows, sm_count(x.device))
    rows_per_program = triton.cdiv(n_rows, n_programs)
    dx = empty(rows.shape, x.dtype, x.device)
    dw_part = empty((n_programs, n_cols), torch.float32, x.device)
    db_part = empty((n_programs, n_cols), torch.float32, x.device)
    _layer_norm_bwd[(n_programs,)](rows, weight, dy_rows, dx, mean, rstd, dw_part, db_part,
                                   rows.stride(0), dy_rows.stride(0), dx.stride(0), n_rows, n_cols,
                                   rows_per_program, BLOCK=block, num_warps=num_warps)
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(dy, x, weight, mean, rstd)
        return dx, dw, db, None


def layer_norm_reference(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
