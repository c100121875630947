"""What every launcher shares: the triton import, the interpreter switch, output allocation.

Every kernel module takes `triton` from here, never by its own import: triton reads
TRITON_INTERPRET when it is imported, so the switch below must run first.
"""
import os
import sys
from contextlib import contextmanager

import torch

# No GPU: run the kernels in Triton's CPU interpreter unless the user decided otherwise. Triton
# reads the switch when it is imported: imported before this (torch.distributed.pipelining and
# torch.compile import it), its own library functions (tl.sum, ...) cannot run in the interpreter.
_IMPORTED_UNINTERPRETED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"


class _TritonMissing:
    """Stands in for `triton` / `triton.language` where triton is not installed, so that the torch
    references (which live next to the kernels) still import; `resolve_backend` refuses 'triton'
    before any kernel could be launched."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    triton = tl = _TritonMissing()
    HAVE_TRITON = False

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("auto", "triton", "torch")


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' means triton on CUDA and torch elsewhere; 'triton'/'torch' pass through."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    if name == "triton" and not HAVE_TRITON:
        raise ValueError("the triton backend needs the triton package (Linux): install it "
                         "(pip install triton) or use --kernels torch")
    if name == "triton" and torch.device(device).type != "cuda" and _IMPORTED_UNINTERPRETED:
        raise ValueError("the triton backend off a GPU runs in Triton's interpreter, but triton was "
                         "imported before minipipe could switch it on: set TRITON_INTERPRET=1 in the "
                         "environment, or import minipipe first, or use --kernels torch")
    return name


def tf32_allowed() -> bool:
    """Whether torch runs float32 matmuls on TF32 tensor cores (set by train.py on CUDA); the
    flash-attention kernels follow it so that every fp32 matmul of a run has one precision."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; reading allow_tf32 after it raises
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


def autotune_configs(gpu_configs, interpreter_config):
    """The interpreter cannot benchmark (multi-config autotune raises there): give it one config."""
    return [interpreter_config] if INTERPRETING else gpu_configs


def sm_count(device: torch.device) -> int:
    """Programs for grid-stride reductions: one per SM on a GPU, a handful in the interpreter
    (which runs programs one after another)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_poison_outputs = False


def empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel must fully overwrite is allocated here, so tests can NaN-fill them."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _poison_outputs else out


@contextmanager
def poisoned_outputs():
    """Inside this context kernel outputs start as NaN: an element a kernel forgets to write fails
    the comparison instead of passing on leftover memory."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = previous
