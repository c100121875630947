"""Llama-family decoder LM as a list of layers: [Embedding, Block x L, Head].

Layer values are the Transformer's (models/transformer.py): token ids (B, T) -> hidden (B, T, D)
-> ... -> in training the Head hands the loss (normalised hidden, its weight) and the loss is the
Transformer's fused linear + cross-entropy; in eval mode it returns logits (B, T, V).

The math is transformers' LlamaForCausalLM, term by term, so weights convert both ways
(minipipe/checkpoint/hf_llama.py):
- token embedding only (positions enter as rotary embeddings on q and k);
- pre-norm blocks: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP -> residual; RMSNorm
  normalises in float32 and scales the result cast back to the input's dtype;
- attention: q, k, v, o linears (separate, as Llama stores them; biases on q, k, v only with
  `attention_bias`, Qwen2's layout), `kv_heads` key/value heads each shared by heads / kv_heads
  query heads (grouped-query attention; kv_heads = heads is multi-head); RoPE in the "rotate half"
  layout (the first and second halves of a head are the pair a frequency rotates) with
  inv_freq_j = theta^(-2j / head_dim) computed in float32 as transformers does;
- SwiGLU MLP: down(silu(gate(x)) * up(x)), width `ffn_dim`;
- a final RMSNorm and a bias-free head, tied to the embedding or not.
Dropout (0 in Llama) sits where the Transformer's does, after each residual branch, so the
equivalence tests exercise masks on this family too.
"""
import math

import torch
from einops import rearrange
from torch import nn

from minipipe.kernels import ops
from minipipe.models import transformer
from minipipe.models.family import Family


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.backend = eps, backend

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps, self.backend)


def rotary_cos_sin(n_positions: int, head_dim: int, theta: float, like: torch.Tensor):
    """cos and sin (T, head_dim) of positions 0..T-1, as transformers' LlamaRotaryEmbedding makes
    them: float32 frequencies (float64 in a float64 run), both halves of a head repeated."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=like.device).to(dtype) / head_dim))
    angles = torch.outer(torch.arange(n_positions, device=like.device).to(dtype), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


class Embedding(nn.Module):
    def __init__(self, vocab: int, d_model: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.tokens.weight, std=0.02)

    def forward(self, ids):
        return self.dropout(self.tokens(ids))


class Block(nn.Module):
    def __init__(self, cfg, backend: str):
        super().__init__()
        d, self.heads, self.kv_heads = cfg.d_model, cfg.heads, cfg.kv_heads
        self.head_dim, self.theta, self.backend = d // cfg.heads, cfg.rope_theta, backend
        bias = bool(cfg.attention_bias)
        self.attn_norm = RMSNorm(d, cfg.norm_eps, backend)
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps, backend)
        self.gate_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, d, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        # GPT-2's scheme: residual projections scaled by 1/sqrt(2L) keep the stream at unit scale.
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj):
            transformer._init_linear(linear, 0.02)
        for linear in (self.o_proj, self.down_proj):
            transformer._init_linear(linear, 0.02 / math.sqrt(2 * cfg.layers))

    def forward(self, x):
        h = self.attn_norm(x)
        q = rearrange(self.q_proj(h), "b t (h d) -> b h t d", d=self.head_dim)
        k = rearrange(self.k_proj(h), "b t (h d) -> b h t d", d=self.head_dim)
        v = rearrange(self.v_proj(h), "b t (h d) -> b h t d", d=self.head_dim)
        cos, sin = rotary_cos_sin(x.shape[1], self.head_dim, self.theta, q)
        q, k = ops.rotary_embedding(q, k, cos, sin, self.backend)
        attn = ops.attention(q, k, v, causal=True, backend=self.backend)  # k, v: kv_heads heads
        x = x + self.dropout(self.o_proj(rearrange(attn, "b h t d -> b t (h d)")))
        h = self.mlp_norm(x)
        return x + self.dropout(self.down_proj(ops.silu_and_mul(self.gate_proj(h), self.up_proj(h), self.backend)))


class Head(nn.Module):
    def __init__(self, d_model: int, vocab: int, eps: float, backend: str):
        super().__init__()
        self.norm = RMSNorm(d_model, eps, backend)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        transformer._init_linear(self.proj, 0.02)

    def forward(self, x):
        hidden = self.norm(x)
        if self.training:  # the loss multiplies by the weight chunk by chunk (transformer.make_loss)
            return hidden, self.proj.weight
        return self.proj(hidden)


def layer_factories(cfg, backend: str):
    return ([lambda: Embedding(cfg.vocab, cfg.d_model, cfg.dropout)]
            + [lambda: Block(cfg, backend)] * cfg.layers
            + [lambda: Head(cfg.d_model, cfg.vocab, cfg.norm_eps, backend)])


FAMILY = Family(
    name="llama", unit="token", data_kind="tokens", default_data="stdlib",
    depth_field="layers", fixed_layers=2, layers_per_depth=1,  # Embedding + L blocks + Head
    layer_factories=layer_factories, make_loss=transformer.make_loss,
    count_loss_units=transformer.count_loss_units,
    units_per_sample=lambda cfg: cfg.seq_len,
    input_shape=lambda cfg, rows: (rows, cfg.seq_len),
    targets_shape=lambda cfg, rows: (rows, cfg.seq_len),
    planning_defaults=lambda cfg: {"vocab": cfg.vocab or 256},  # the byte-level default data
    describe=lambda cfg: (f"{cfg.layers} blocks, d_model {cfg.d_model}, {cfg.heads} heads "
                          f"({cfg.kv_heads} kv), ffn {cfg.ffn_dim}, seq {cfg.seq_len}"),
    tied_weight=transformer.tied_weight)  # --tie-embeddings: the Head's proj.weight is tokens.weight
