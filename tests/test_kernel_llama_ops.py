"""The Llama family's kernels (RMSNorm, RoPE, SwiGLU) against their plain-torch references in the
interpreter: fp32 and fp16 over odd shapes, every output and every gradient, outputs NaN-poisoned
(kernels/testing.py); and each torch path against its reference in float64."""
import pytest
import torch

from minipipe.kernels import ops, rmsnorm, rope, swiglu
from minipipe.kernels.testing import DEVICE, DTYPES, GPU_ONLY, check_against_reference


def _angles(t, d, theta=10000.0):
    """cos, sin (T, D) as models/llama.py makes them: D/2 frequencies, both halves repeated."""
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq).repeat(1, 2)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def _rms_norm(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=DEVICE) * 3 + 1).to(dtype).requires_grad_()
    weight = torch.randn(shape[-1], device=DEVICE).requires_grad_()
    check_against_reference(lambda x, w: ops.rms_norm(x, w, 1e-5, "triton"),
                            lambda x, w: rmsnorm.rms_norm_reference(x, w, 1e-5), [x, weight], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 33), (37, 1000), (2, 3000)])
def test_rms_norm_matches_reference(shape, dtype):
    _rms_norm(shape, dtype)


def test_rms_norm_handles_largest_hidden_size():
    _rms_norm((3, rmsnorm.MAX_HIDDEN), torch.float32)


def test_rms_norm_rejects_oversized_hidden():
    n = rmsnorm.MAX_HIDDEN + 1
    with pytest.raises(ValueError, match="up to"):
        ops.rms_norm(torch.randn(2, n, device=DEVICE), torch.ones(n, device=DEVICE), 1e-5, "triton")


def _rope(b, h, h_kv, t, d, dtype, strided=False):
    torch.manual_seed(0)
    if strided:  # as models/llama.py hands them over: (B, T, H*D) projections viewed as (B, H, T, D)
        q = torch.randn(b, t, h, d, device=DEVICE).to(dtype).transpose(1, 2).requires_grad_()
    else:
        q = torch.randn(b, h, t, d, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(b, h_kv, t, d, device=DEVICE).to(dtype).requires_grad_()
    cos, sin = (a.to(dtype) for a in _angles(t, d))
    check_against_reference(lambda q, k, c, s: ops.rotary_embedding(q, k, c, s, "triton"),
                            lambda q, k, c, s: (rope.rope_reference(q, c, s), rope.rope_reference(k, c, s)),
                            [q, k, cos, sin], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 2), (2, 3, 1, 5, 6), (1, 4, 2, 7, 64), (1, 2, 2, 3, 98)])
def test_rotary_embedding_matches_reference(shape, dtype):
    _rope(*shape, dtype)


def test_rotary_embedding_reads_strided_heads():
    _rope(2, 3, 3, 5, 16, torch.float32, strided=True)


def test_rotary_embedding_refuses_odd_head_dims():
    x = torch.randn(1, 1, 3, 5, device=DEVICE)
    cos, sin = torch.ones(3, 5, device=DEVICE), torch.zeros(3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="even head dim"):
        ops.rotary_embedding(x, x, cos, sin, "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5, 33), (7, 1000), (2, 2500)])
def test_silu_and_mul_matches_reference(shape, dtype):
    torch.manual_seed(0)
    gate, up = ((torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_() for _ in range(2))
    check_against_reference(lambda g, u: ops.silu_and_mul(g, u, "triton"), swiglu.swiglu_reference,
                            [gate, up], dtype)


@GPU_ONLY
def test_llama_kernels_match_references_bf16():
    _rms_norm((37, 1000), torch.bfloat16)
    _rope(2, 8, 2, 300, 64, torch.bfloat16)
    gate, up = (torch.randn(7, 1000, device=DEVICE).to(torch.bfloat16).requires_grad_() for _ in range(2))
    check_against_reference(lambda g, u: ops.silu_and_mul(g, u, "triton"), swiglu.swiglu_reference,
                            [gate, up], torch.bfloat16)


def test_torch_paths_equal_the_references_in_float64():
    """--kernels torch: F.rms_norm, the rotate-half formula, F.silu(gate) * up."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 7, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, "torch"), rmsnorm.rms_norm_reference(x, w, 1e-6),
                               rtol=1e-12, atol=1e-12)
    g, u = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(ops.silu_and_mul(g, u, "torch"), g * torch.sigmoid(g) * u,
                               rtol=1e-12, atol=1e-12)
