"""SwiGLU's gated activation, silu(gate) * up (Shazeer 2020), as one elementwise pass each way.

The backward recomputes silu from the saved gate and up instead of saving the activation:
d/dgate = dy * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))), d/dup = dy * silu(g). Math in fp32
whatever the storage."""
import torch

from minipipe.kernels.runtime import autotune_configs, empty, tl, triton

_CONFIGS = autotune_configs([triton.Config({"BLOCK": b}, num_warps=w)
                             for b, w in ((1024, 4), (2048, 8), (4096, 8))],
                            triton.Config({"BLOCK": 1024}))


@triton.autotune(configs=_CONFIGS, key=["n_elements"])
@triton.jit
def _swiglu_fwd(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["n_elements"])
@triton.jit
def _swiglu_bwd(gate_ptr, up_ptr, dy_ptr, dgate_ptr, dup_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(dgate_ptr + offsets, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dgate_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dup_ptr + offsets, (dy * g * sig).to(dup_ptr.dtype.element_ty), mask=mask)


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def swiglu_forward(gate, up):
    out = empty(gate.shape, gate.dtype, gate.device)
    _swiglu_fwd[_grid(gate.numel())](gate, up, out, gate.numel())
    return out


def swiglu_backward(dy, gate, up):
    dgate, dup = empty(gate.shape, gate.dtype, gate.device), empty(up.shape, up.dtype, up.device)
    _swiglu_bwd[_grid(gate.numel())](gate, up, dy, dgate, dup, gate.numel())
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"silu_and_mul needs gate and up of one shape, got {tuple(gate.shape)}, "
                             f"{tuple(up.shape)}")
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        return swiglu_backward(dy.contiguous(), *ctx.saved_tensors)


def swiglu_reference(gate, up):
    return torch.nn.functional.silu(gate) * up
