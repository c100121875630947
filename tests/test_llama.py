"""The Llama family against independent references: parameter counts (a closed form and
SmolLM2-135M's published 134,515,008), training FLOPs per token (a closed form with grouped-query
attention and SwiGLU), the block against an explicit plain-torch Llama block that repeats K/V, and
the config's refusals."""
import math

import pytest
import torch
import torch.nn.functional as F

from minipipe.config import make_config
from minipipe.errors import ConfigError
from minipipe.layers import build_layers, count_layer_params
from minipipe.models import registry
from minipipe.pipeline.spec import pipeline_spec
from minipipe.plan import model_flops_per_unit

SHAPE = dict(model="llama", layers=3, d_model=48, heads=6, kv_heads=2, ffn_dim=80, max_seq_len=16,
             vocab=96)


def matmul_params(cfg) -> int:
    """Weights that multiply activations: per block q, k, v, o and gate, up, down; the head."""
    head_dim = cfg.d_model // cfg.heads
    attention = cfg.d_model * head_dim * (cfg.heads + 2 * cfg.kv_heads) + cfg.heads * head_dim * cfg.d_model
    return cfg.layers * (attention + 3 * cfg.d_model * cfg.ffn_dim) + cfg.d_model * cfg.vocab


def closed_form_param_count(cfg) -> int:
    """Embedding + L blocks (2 RMSNorms, q/k/v [+ biases], o, gate/up/down) + final RMSNorm + head."""
    head_dim = cfg.d_model // cfg.heads
    biases = cfg.layers * head_dim * (cfg.heads + 2 * cfg.kv_heads) if cfg.attention_bias else 0
    head = 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab
    return (matmul_params(cfg) - cfg.d_model * cfg.vocab + cfg.vocab * cfg.d_model + biases
            + (2 * cfg.layers + 1) * cfg.d_model + head)


@pytest.mark.parametrize("values", [dict(preset="tiny", vocab=256), dict(preset="small", vocab=256),
                                    dict(SHAPE, attention_bias=True)])
def test_param_count_matches_closed_form(values):
    cfg = make_config(**{"model": "llama", **values})
    assert sum(count_layer_params(cfg, tie_copied=False)) == closed_form_param_count(cfg)
    assert len(registry.layer_factories(cfg)) == cfg.layers + 2


def test_smollm2_preset_is_smollm2_135m():
    cfg = make_config(model="llama", preset="smollm2")
    assert (cfg.layers, cfg.d_model, cfg.heads, cfg.kv_heads, cfg.ffn_dim, cfg.vocab) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings
    assert sum(count_layer_params(cfg, tie_copied=False)) == 134_515_008  # the model card's 135M


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_flops_per_token_count_gqa_and_swiglu(kv_heads):
    """Forward + backward = 3 x forward; forward: 2 FLOPs per weight of every matmul (K and V are
    only kv_heads wide) plus, per layer, q k^T and p v over all T positions of every query head."""
    cfg = make_config(**dict(SHAPE, kv_heads=kv_heads), batch_size=4, microbatches=2)
    attention = cfg.layers * 2 * 2 * cfg.seq_len * cfg.d_model
    assert model_flops_per_unit(cfg, spec=pipeline_spec(cfg, 1)) == 3 * (2 * matmul_params(cfg) + attention)


def plain_llama_block(block, x):
    """The block written out: explicit RMS, K and V repeated per query head, the causal softmax,
    RoPE as complex rotation of the (j, j + D/2) pairs, silu(gate) * up."""
    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + block.attn_norm.eps)

    b, t, _ = x.shape
    hd = block.head_dim
    h = rms(x, block.attn_norm.weight)
    q = block.q_proj(h).view(b, t, block.heads, hd).transpose(1, 2)
    k = block.k_proj(h).view(b, t, block.kv_heads, hd).transpose(1, 2)
    v = block.v_proj(h).view(b, t, block.kv_heads, hd).transpose(1, 2)
    angles = torch.arange(t, dtype=x.dtype)[:, None] * block.theta ** (-torch.arange(0, hd, 2, dtype=x.dtype) / hd)
    rotation = torch.polar(torch.ones_like(angles), angles)

    def rotate(z):
        pairs = torch.complex(z[..., : hd // 2], z[..., hd // 2:]) * rotation
        return torch.cat((pairs.real, pairs.imag), dim=-1)

    q, k = rotate(q), rotate(k)
    group = block.heads // block.kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
    x = x + block.o_proj(attn)
    h = rms(x, block.mlp_norm.weight)
    return x + block.down_proj(F.silu(block.gate_proj(h)) * block.up_proj(h))


@pytest.mark.parametrize("kv_heads", [1, 3, 6])
def test_block_equals_plain_llama_block(kv_heads):
    cfg = make_config(**dict(SHAPE, kv_heads=kv_heads), attention_bias=True, rope_theta=500.0,
                      dtype="float64")
    block = build_layers(cfg, [1])[1].double()
    x = torch.randn(2, 11, cfg.d_model, dtype=torch.float64, requires_grad=True)
    got, expected = block(x), plain_llama_block(block, x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, [x, *block.parameters()], grad)
    expected_grads = torch.autograd.grad(expected, [x, *block.parameters()], grad)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("values, message", [
    (dict(heads=6, kv_heads=4), "not a multiple of --kv-heads"),
    (dict(d_model=42, heads=6, kv_heads=2), "is odd"),
    (dict(rope_theta=0.0), "--rope-theta must be > 0"),
    (dict(model="transformer", kv_heads=2), "--kv-heads shape a Llama model"),
])
def test_config_refuses_shapes_it_cannot_build(values, message):
    base = SHAPE if values.get("model", "llama") == "llama" else {}
    with pytest.raises(ConfigError, match=message):
        make_config(**{**base, **values})
