import pytest
import torch

from minipipe.kernels import ops
from minipipe.kernels.flash_attention import attention_reference
from minipipe.kernels.testing import DEVICE, DTYPES, GPU_ONLY, check_against_reference

# (B, H, T, D): a single query row, a tail shorter than one block, T across several blocks.
SHAPES = [(1, 1, 1, 16), (2, 1, 5, 32), (1, 2, 37, 16), (1, 1, 50, 64), (1, 1, 19, 128)]


def _run(shape, causal, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device=DEVICE).to(dtype).requires_grad_() for _ in range(3))
    check_against_reference(lambda q, k, v: ops.attention(q, k, v, causal, backend="triton"),
                            lambda q, k, v: attention_reference(q, k, v, causal),
                            [q, k, v], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_flash_attention_matches_reference(shape, causal, dtype):
    _run(shape, causal, dtype)


# (B, H, H_kv, T, D): grouped-query attention, one and several key/value heads, tails.
GQA_SHAPES = [(1, 4, 2, 37, 16), (2, 3, 1, 19, 32), (1, 6, 3, 5, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", GQA_SHAPES)
def test_grouped_query_attention_matches_reference(shape, causal, dtype):
    """Every query head of a group reads its one key/value head; dK, dV sum over the group."""
    b, h, h_kv, t, d = shape
    torch.manual_seed(0)
    q = torch.randn(b, h, t, d, device=DEVICE).to(dtype).requires_grad_()
    k, v = (torch.randn(b, h_kv, t, d, device=DEVICE).to(dtype).requires_grad_() for _ in range(2))
    check_against_reference(lambda q, k, v: ops.attention(q, k, v, causal, backend="triton"),
                            lambda q, k, v: attention_reference(q, k, v, causal),
                            [q, k, v], dtype)


def test_key_value_heads_must_divide_query_heads():
    q, k = torch.randn(1, 4, 4, 16, device=DEVICE), torch.randn(1, 3, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of H_kv"):
        ops.attention(q, k, k, True, backend="triton")


def test_flash_attention_accepts_strided_heads():
    """The Transformer hands over q, k, v as strided views of one qkv projection."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3, 2, 16, device=DEVICE).permute(2, 0, 3, 1, 4).requires_grad_()
    check_against_reference(lambda t: ops.attention(t[0], t[1], t[2], True, backend="triton"),
                            lambda t: attention_reference(t[0], t[1], t[2], True),
                            [qkv], torch.float32)


@GPU_ONLY
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 300, 64), (1, 2, 129, 128)])
def test_flash_attention_matches_reference_bf16(shape, causal):
    _run(shape, causal, torch.bfloat16)


def test_reference_is_deterministic_in_float64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 11, 16, dtype=torch.float64) for _ in range(3))
    first = ops.attention(q, k, v, True, backend="torch")
    assert torch.equal(first, ops.attention(q, k, v, True, backend="torch"))


def test_unsupported_head_dim_is_refused():
    q = torch.randn(1, 1, 4, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        ops.attention(q, q, q, True, backend="triton")


def test_autotuning_settles_over_a_200_token_generation():
    """Engine.generate feeds the whole context each token, so T grows by one per token (up to
    max_context). The autotuner benchmarks every config once per distinct key: count the keys its
    own key names take over the launches a 200-token generation makes (forward and backward
    kernels, recorded from the real launcher on meta tensors, nothing run)."""
    from minipipe.kernels import aot
    from minipipe.kernels.flash_attention import attention_backward, attention_forward

    prompt_len, max_context = 1, 256
    with aot.record_launches() as launches:
        for i in range(200):
            q = torch.empty(1, 2, min(prompt_len + i, max_context), 64, device="meta")
            o, lse = attention_forward(q, q, q, True)
            attention_backward(q, q, q, q, o, lse, True)
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        keys = {launch.tuning_key for launch in launches if launch.name == name}
        assert 1 < len(keys) <= 5, (name, sorted(keys))  # T in 1..200: buckets 16, 32, ..., 256


@pytest.mark.parametrize("kv_heads", [3, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_is_sdpa_and_matches_the_explicit_reference_in_float64(causal, kv_heads):
    """--kernels torch runs F.scaled_dot_product_attention (enable_gqa when k, v have fewer
    heads); the explicit softmax stays the check."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 13, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 13, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sdpa = ops.attention(q, k, v, causal, backend="torch")
    assert torch.equal(sdpa, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=kv_heads != 3))
    grad = torch.randn_like(sdpa)
    got = torch.autograd.grad(sdpa, (q, k, v), grad)
    expected_out = attention_reference(q, k, v, causal)
    expected = torch.autograd.grad(expected_out, (q, k, v), grad)
    torch.testing.assert_close(sdpa, expected_out, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
