import pytest
import torch

from minipipe.kernels import ops
from minipipe.kernels.testing import DEVICE, DTYPES, assert_close

SHAPES = [(37, 5), (129,), (3, 7, 11), (1,), (5000,)]  # (5000,) spans two kernel blocks
LRS = [1e-2, 3e-3, 5e-2, 1e-3, 2e-2]  # an LR schedule: lr changes before every step


def _setup(dtype):
    """Fresh parameters, the gradients of five steps, and the hyper-parameters for `dtype`."""
    torch.manual_seed(0)
    params = [torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_() for shape in SHAPES]
    grads = [[torch.randn_like(p) for p in params] for _ in LRS]
    # fp16 exp_avg_sq underflows for small gradients (g^2 < 6e-8); an eps far below sqrt of that
    # turns the two sides' different roundings into steps of different size, so fp16 uses 1e-3.
    eps = 1e-6 if dtype == torch.float32 else 1e-3
    return params, grads, dict(lr=LRS[0], betas=(0.8, 0.95), eps=eps, weight_decay=0.1)


def _run_steps(optimizer, params, grads, steps):
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = LRS[step]
        for p, g in zip(params, grads[step]):
            p.grad = g
        optimizer.step()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_adamw_matches_torch_over_five_steps_with_changing_lr(backend, dtype):
    params, grads, hyper = _setup(dtype)
    expected = [p.detach().clone().requires_grad_() for p in params]
    reference = torch.optim.AdamW(expected, **hyper)
    _run_steps(reference, expected, grads, range(5))
    optimizer = ops.AdamW(params, **hyper, backend=backend)
    _run_steps(optimizer, params, grads, range(5))
    for p, q in zip(params, expected):
        assert_close(p, q, dtype, "param")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(optimizer.state[p][key], reference.state[q][key], dtype, key)
        assert optimizer.state[p]["step"].item() == 5


def test_checkpoints_interchange_with_torch_adamw():
    """Three steps in torch.optim.AdamW, then two in ours from its state_dict, equal five in torch;
    and our state_dict loads back into torch.optim.AdamW unchanged."""
    params, grads, hyper = _setup(torch.float32)
    expected = [p.detach().clone().requires_grad_() for p in params]
    _run_steps(torch.optim.AdamW(expected, **hyper), expected, grads, range(5))
    reference = torch.optim.AdamW(params, **hyper)
    _run_steps(reference, params, grads, range(3))
    optimizer = ops.AdamW(params, **hyper, backend="triton")
    optimizer.load_state_dict(reference.state_dict())
    _run_steps(optimizer, params, grads, range(3, 5))
    for p, q in zip(params, expected):
        assert_close(p, q, torch.float32, "param")
    ours = optimizer.state_dict()
    assert set(ours["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    back = torch.optim.AdamW(params, **hyper)
    back.load_state_dict(ours)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(back.state_dict()["state"][0][key], ours["state"][0][key])
