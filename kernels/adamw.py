"""AdamW (decoupled weight decay, bias correction) as one fused launch per (device, dtype).

The multi-tensor launch works from tables instead of a flat parameter buffer, so parameters stay
ordinary tensors: a (n_tensors, 4) table of raw addresses (param, grad, exp_avg, exp_avg_sq), and
a block table mapping each program to (tensor, first element). Raw addresses are cast back to
pointers in the kernel; this also works in the interpreter, where addresses are host addresses.

State layout and arithmetic follow torch.optim.AdamW (per-param 'step' as a CPU scalar tensor,
'exp_avg', 'exp_avg_sq'), so checkpoints move between the two optimizers either way."""
import math

import torch

from minipipe.kernels.runtime import resolve_backend, tl, triton

BLOCK = 4096


@triton.jit
def _adamw_kernel(pointer_table, numel_ptr, block_tensor_ptr, block_start_ptr, step_scalars_ptr,
                  lr, beta1, beta2, eps, weight_decay, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    offsets = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numel_ptr + tensor)
    param_ptr = tl.load(pointer_table + tensor * 4).to(tl.pointer_type(DTYPE))
    grad_ptr = tl.load(pointer_table + tensor * 4 + 1).to(tl.pointer_type(DTYPE))
    exp_avg_ptr = tl.load(pointer_table + tensor * 4 + 2).to(tl.pointer_type(DTYPE))
    exp_avg_sq_ptr = tl.load(pointer_table + tensor * 4 + 3).to(tl.pointer_type(DTYPE))
    step_size = tl.load(step_scalars_ptr + tensor * 2)
    bias_correction2_sqrt = tl.load(step_scalars_ptr + tensor * 2 + 1)

    param = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    param = param * (1.0 - lr * weight_decay)
    exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
    denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    param = param - step_size * (exp_avg / denom)
    tl.store(param_ptr + offsets, param.to(DTYPE), mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg.to(DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(DTYPE), mask=mask)


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _bias_corrections(step: float, lr: float, beta1: float, beta2: float):
    """(step_size, sqrt(bias_correction2)) exactly as torch computes them, in Python floats."""
    return lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)


def _triton_step(tensors, steps, lr, beta1, beta2, eps, weight_decay):
    """One launch over same-device, same-dtype (param, grad, exp_avg, exp_avg_sq) quadruples."""
    device, dtype = tensors[0][0].device, tensors[0][0].dtype
    numels = torch.tensor([quad[0].numel() for quad in tensors], dtype=torch.int64)
    blocks = (numels + BLOCK - 1) // BLOCK
    block_tensor = torch.repeat_interleave(torch.arange(len(tensors)), blocks)
    first_block = torch.repeat_interleave(torch.cumsum(blocks, 0) - blocks, blocks)
    block_start = (torch.arange(len(block_tensor)) - first_block) * BLOCK
    pointers = torch.tensor([[t.data_ptr() for t in quad] for quad in tensors], dtype=torch.int64)
    scalars = torch.tensor([_bias_corrections(s, lr, beta1, beta2) for s in steps], dtype=torch.float32)
    tables = [t.to(device, non_blocking=True)
              for t in (pointers, numels, block_tensor, block_start, scalars)]
    _adamw_kernel[(len(block_tensor),)](*tables, lr, beta1, beta2, eps, weight_decay,
                                        DTYPE=_TRITON_DTYPES[dtype], BLOCK=BLOCK, num_warps=8)


def _torch_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW's single-tensor update: the reference the kernel is tested against."""
    step_size, bias_correction2_sqrt = _bias_corrections(step, lr, beta1, beta2)
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's constructor, update and state_dict, plus `backend`: 'triton' runs one
    fused kernel per (device, dtype) group, 'torch' the reference, 'auto' picks by device."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 backend="auto"):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1): got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.backend = backend

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            batches = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                quad = (param, param.grad, state["exp_avg"], state["exp_avg_sq"])
                step = state["step"].item()
                if resolve_backend(self.backend, param.device) == "torch":
                    _torch_step(*quad, step, **hyper)
                    continue
                if not all(t.is_contiguous() and t.dtype == param.dtype for t in quad):
                    raise RuntimeError("AdamW backend 'triton' needs contiguous parameters, "
                                       "gradients and state of one dtype: use backend 'torch'")
                batch = batches.setdefault((param.device, param.dtype), ([], []))
                batch[0].append(quad)
                batch[1].append(step)
            for tensors, steps in batches.values():
                _triton_step(tensors, steps, **hyper)
        return loss
