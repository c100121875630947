import importlib
import inspect
import pkgutil

import pytest
import torch

import kernels

F64 = dict(dtype=torch.float64)


def test_each_name_in_kernels_is_one_thing():
    """`kernels.<op>` is a dispatch function and `kernels.<module>` that module: no public name of
    the package shadows a submodule, so neither needs importlib to be reached."""
    assert not [name for name in kernels.__all__ if inspect.ismodule(getattr(kernels, name))]
    submodules = sorted(info.name for info in pkgutil.iter_modules(kernels.__path__))
    clashes = sorted(set(submodules) & set(kernels.__all__))
    assert not clashes, f"submodules named like a dispatch function: {clashes}"
    shadowed = [name for name in submodules
                if importlib.import_module(f"kernels.{name}") is not getattr(kernels, name)]
    assert not shadowed, f"kernels.<name> is not the submodule of that name: {shadowed}"


def test_auto_means_triton_on_cuda_and_torch_elsewhere():
    assert kernels.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert kernels.resolve_backend("triton", torch.device("cpu")) == "triton"
    assert kernels.resolve_backend("torch", torch.device("cuda")) == "torch"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernels.resolve_backend("cuda", torch.device("cpu"))


def _leaf(*shape):
    return torch.randn(*shape, **F64).requires_grad_()


# Every op on the torch backend in float64: what the trainer's exactness tests run on CPU.
TORCH_OPS = {
    "layer_norm": (lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, "torch"),
                   lambda: (_leaf(2, 3, 5), _leaf(5), _leaf(5))),
    "attention": (lambda q, k, v: kernels.attention(q, k, v, True, "torch"),
                  lambda: (_leaf(1, 2, 4, 3), _leaf(1, 2, 4, 3), _leaf(1, 2, 4, 3))),
    "cross_entropy": (lambda x: kernels.cross_entropy(x, torch.tensor([1, -100, 3]), backend="torch"),
                      lambda: (_leaf(3, 5),)),
    "linear_cross_entropy": (lambda h, w, b: kernels.linear_cross_entropy(
                                 h, w, b, torch.tensor([1, 0, 3]), reduction="sum", backend="torch"),
                             lambda: (_leaf(3, 4), _leaf(5, 4), _leaf(5))),
    "bias_gelu": (lambda x, b: kernels.bias_gelu(x, b, "none", "torch"), lambda: (_leaf(3, 4), _leaf(4))),
    "batch_norm": (lambda x, w, b: kernels.batch_norm(x, w, b, 1e-5, True, "torch")[0],
                   lambda: (_leaf(3, 2, 2, 2), _leaf(2), _leaf(2))),
    "batch_norm_eval": (lambda x, w, b: kernels.batch_norm_eval(
                            x, w, b, torch.zeros(2, **F64), torch.ones(2, **F64), 1e-5, False, "torch"),
                        lambda: (_leaf(3, 2, 2, 2), _leaf(2), _leaf(2))),
}


@pytest.mark.parametrize("op", sorted(TORCH_OPS))
def test_torch_backend_is_differentiable_in_float64(op):
    torch.manual_seed(0)
    fn, make_inputs = TORCH_OPS[op]
    assert torch.autograd.gradcheck(fn, make_inputs())
