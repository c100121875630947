"""The one place that says how close a kernel must be to its reference, the harness that checks a
kernel's outputs and every gradient against the reference evaluated in float64, and what every
kernel test shares: the device, the dtypes and the mark of the GPU-only (bfloat16) cases."""
import pytest
import torch

from minipipe.kernels.runtime import poisoned_outputs

# Kernel tests run on the GPU when there is one, else on the CPU through Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The storage dtypes every kernel test covers on every device; bfloat16 cases are GPU_ONLY.
DTYPES = (torch.float32, torch.float16)
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="bf16 arithmetic is wrong in Triton's CPU interpreter")

# Kernels compute in fp32 whatever the storage; these bound storage rounding plus fp32 reordering.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def assert_close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype],
                               msg=lambda m: f"{what} ({dtype}): {m}")


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check_against_reference(kernel_fn, reference_fn, inputs, dtype):
    """Run kernel_fn(*inputs) with NaN-poisoned output buffers and reference_fn on float64 copies
    of the same inputs; compare every output, then backpropagate the same random output gradient
    through both and compare the gradient of every input that requires grad."""
    kernel_inputs = [t.detach().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t
                     for t in inputs]
    reference_inputs = [t.detach().double().requires_grad_(t.requires_grad)
                        if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
    with poisoned_outputs():
        outputs = _as_tuple(kernel_fn(*kernel_inputs))
    expected = _as_tuple(reference_fn(*reference_inputs))
    for i, (out, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert_close(out, ref, dtype, f"output {i}")
    differentiable = [i for i, out in enumerate(outputs) if out.requires_grad]
    if not differentiable:
        return
    grads = [torch.randn_like(outputs[i]) for i in differentiable]
    with poisoned_outputs():
        torch.autograd.backward([outputs[i] for i in differentiable], grads)
    torch.autograd.backward([expected[i] for i in differentiable], [g.double() for g in grads])
    for i, (got, ref) in enumerate(zip(kernel_inputs, reference_inputs)):
        if torch.is_tensor(got) and got.requires_grad:
            assert_close(got.grad, ref.grad, dtype, f"gradient of input {i}")
