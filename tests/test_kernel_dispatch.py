import inspect
import pkgutil

import pytest
import torch

from minipipe import kernels
from minipipe.kernels import ops

F64 = dict(dtype=torch.float64)


def test_each_dispatch_name_is_one_thing():
    """`ops.<op>` is a dispatch function and `minipipe.kernels.<module>` that module: no dispatch
    name is also a kernel module's name, and no public name of ops is a module."""
    assert not [name for name in ops.__all__ if inspect.ismodule(getattr(ops, name))]
    submodules = sorted(info.name for info in pkgutil.iter_modules(kernels.__path__))
    assert "flash_attention" in submodules  # the listing sees the kernel folder
    clashes = sorted(set(submodules) & set(ops.__all__))
    assert not clashes, f"kernel modules named like a dispatch function: {clashes}"


def test_auto_means_triton_on_cuda_and_torch_elsewhere():
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert ops.resolve_backend("triton", torch.device("cpu")) == "triton"
    assert ops.resolve_backend("torch", torch.device("cuda")) == "torch"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        ops.resolve_backend("cuda", torch.device("cpu"))


def _leaf(*shape):
    return torch.randn(*shape, **F64).requires_grad_()


def _rotary_angles(t, d):
    angles = torch.randn(t, d // 2, **F64).repeat(1, 2)
    return angles.cos(), angles.sin()


# Every op on the torch backend in float64: what the trainer's exactness tests run on CPU.
TORCH_OPS = {
    "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, "torch"),
                   lambda: (_leaf(2, 3, 5), _leaf(5), _leaf(5))),
    "attention": (lambda q, k, v: ops.attention(q, k, v, True, "torch"),
                  lambda: (_leaf(1, 2, 4, 3), _leaf(1, 2, 4, 3), _leaf(1, 2, 4, 3))),
    "attention (grouped-query)": (lambda q, k, v: ops.attention(q, k, v, True, "torch"),
                                  lambda: (_leaf(1, 4, 4, 3), _leaf(1, 2, 4, 3), _leaf(1, 2, 4, 3))),
    "rms_norm": (lambda x, w: ops.rms_norm(x, w, 1e-6, "torch"), lambda: (_leaf(2, 3, 5), _leaf(5))),
    "rotary_embedding": (lambda q, k, cos, sin: ops.rotary_embedding(q, k, cos, sin, "torch"),
                         lambda: (_leaf(1, 2, 4, 6), _leaf(1, 1, 4, 6), *_rotary_angles(4, 6))),
    "silu_and_mul": (lambda g, u: ops.silu_and_mul(g, u, "torch"), lambda: (_leaf(3, 4), _leaf(3, 4))),
    "cross_entropy": (lambda x: ops.cross_entropy(x, torch.tensor([1, -100, 3]), backend="torch"),
                      lambda: (_leaf(3, 5),)),
    "linear_cross_entropy": (lambda h, w, b: ops.linear_cross_entropy(
                                 h, w, b, torch.tensor([1, 0, 3]), reduction="sum", backend="torch"),
                             lambda: (_leaf(3, 4), _leaf(5, 4), _leaf(5))),
    "bias_gelu": (lambda x, b: ops.bias_gelu(x, b, "none", "torch"), lambda: (_leaf(3, 4), _leaf(4))),
    "batch_norm": (lambda x, w, b: ops.batch_norm(x, w, b, 1e-5, True, "torch")[0],
                   lambda: (_leaf(3, 2, 2, 2), _leaf(2), _leaf(2))),
    "batch_norm_eval": (lambda x, w, b: ops.batch_norm_eval(
                            x, w, b, torch.zeros(2, **F64), torch.ones(2, **F64), 1e-5, False, "torch"),
                        lambda: (_leaf(3, 2, 2, 2), _leaf(2), _leaf(2))),
}


@pytest.mark.parametrize("op", sorted(TORCH_OPS))
def test_torch_backend_is_differentiable_in_float64(op):
    torch.manual_seed(0)
    fn, make_inputs = TORCH_OPS[op]
    assert torch.autograd.gradcheck(fn, make_inputs())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter switch is for machines without a GPU")
def test_triton_imported_before_the_interpreter_switch_is_refused_by_name():
    """torch.distributed.pipelining imports triton: its library functions are then compiled-mode
    objects that the interpreter cannot run, so the triton backend says so instead of failing
    inside a kernel."""
    import os
    import subprocess
    import sys
    code = ("from torch.distributed import pipelining\n"
            "import torch\n"
            "from minipipe.kernels import runtime\n"
            "try:\n"
            "    runtime.resolve_backend('triton', torch.device('cpu'))\n"
            "except ValueError as err:\n"
            "    print(err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "set TRITON_INTERPRET=1 in the environment" in done.stdout, done.stderr
