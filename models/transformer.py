"""GPT-style decoder LM as a list of layers: [Embedding, Block x L, Head].

Layer values: token ids (B, T) int64 -> hidden (B, T, D) -> ... -> logits (B, T, V) in eval mode.
In training the Head hands the loss (normalised hidden (B, T, D), its weight (V, D)) instead of
logits, and the loss runs ops.linear_cross_entropy, which goes through the tokens a chunk at a
time: the (tokens x vocab) logits never exist whole. The weight in that tuple is the Parameter
itself, so the loss's gradient reaches it through autograd like any other use.
Pre-LN blocks (LayerNorm -> causal attention -> residual, LayerNorm -> GELU MLP -> residual),
final LayerNorm + bias-free linear head. The hot ops go through `kernels` (Triton or the plain
torch reference, chosen by `backend`).

The math is GPT-2's (transformers' GPT2LMHeadModel), term by term, so weights convert both ways
(minipipe/checkpoint/hf_gpt2.py): token + learned position embeddings; LayerNorm eps 1e-5; q, k, v from one
biased linear in that order, heads split as (head, head_dim); softmax(q k^T / sqrt(head_dim));
GELU with the tanh approximation (GPT-2's gelu_new); biased linears; a final LayerNorm; a head
without bias. Dropout sits where GPT-2's embd_pdrop and resid_pdrop do (after the embedding sum
and after each residual branch's projection); GPT-2's attn_pdrop (on the attention
probabilities) has no counterpart here, so exports say attn_pdrop 0.

With `tie_embeddings` the Embedding's token matrix is also the Head's weight (both layers carry
`tied = True`; minipipe/pipeline/tied.py keeps the copies one weight when they sit on different stages).
"""
import math

import torch
from einops import rearrange
from torch import nn

from minipipe.kernels import ops
from minipipe.models.family import Family, TiedWeight

IGNORE_INDEX = -100


def _init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, backend: str, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.backend = eps, backend

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, self.backend)


class Embedding(nn.Module):
    def __init__(self, vocab: int, d_model: int, max_seq_len: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(max_seq_len, d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.dropout(self.tokens(ids) + self.positions(pos))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float, n_layers: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.ln_attn = LayerNorm(d_model, backend)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_proj = nn.Linear(d_model, d_model)
        self.ln_mlp = LayerNorm(d_model, backend)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        # GPT-2: residual projections scaled by 1/sqrt(2L) so the residual stream keeps unit scale.
        for linear in (self.qkv, self.fc):
            _init_linear(linear, 0.02)
        for linear in (self.attn_proj, self.mlp_proj):
            _init_linear(linear, 0.02 / math.sqrt(2 * n_layers))

    def forward(self, x):
        q, k, v = rearrange(self.qkv(self.ln_attn(x)), "b t (three h d) -> three b h t d",
                            three=3, h=self.heads)
        attn = ops.attention(q, k, v, causal=True, backend=self.backend)
        x = x + self.dropout(self.attn_proj(rearrange(attn, "b h t d -> b t (h d)")))
        hidden = ops.bias_gelu(nn.functional.linear(self.ln_mlp(x), self.fc.weight), self.fc.bias,
                                   approximate="tanh", backend=self.backend)
        return x + self.dropout(self.mlp_proj(hidden))


class Head(nn.Module):
    def __init__(self, d_model: int, vocab: int, backend: str):
        super().__init__()
        self.ln = LayerNorm(d_model, backend)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        _init_linear(self.proj, 0.02)

    def forward(self, x):
        hidden = self.ln(x)
        if self.training:  # the loss multiplies by the weight chunk by chunk (make_loss)
            return hidden, self.proj.weight
        return self.proj(hidden)


def layer_factories(cfg, backend: str):
    blocks = [lambda: Block(cfg.d_model, cfg.heads, cfg.dropout, cfg.layers, backend)] * cfg.layers
    return ([lambda: Embedding(cfg.vocab, cfg.d_model, cfg.max_seq_len, cfg.dropout)]
            + blocks + [lambda: Head(cfg.d_model, cfg.vocab, backend)])


def tied_weight(cfg) -> TiedWeight | None:
    """--tie-embeddings: the Head's proj.weight is the Embedding's tokens.weight (GPT-2)."""
    return TiedWeight(0, "tokens.weight", cfg.layers + 1, "proj.weight") if cfg.tie_embeddings else None


def make_loss(backend: str):
    def loss_sum(output, targets):
        """Token cross-entropy summed over the counted (non-ignored) tokens, of the Head's
        (hidden, weight) in training (fused: no whole logits) or of its logits in evaluation."""
        if isinstance(output, tuple):
            hidden, weight = output
            hidden = hidden.reshape(-1, hidden.shape[-1])
            device = hidden.device.type
            if device != "meta" and torch.is_autocast_enabled(device):  # F.linear's dtype there
                dtype = torch.get_autocast_dtype(device)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
            return ops.linear_cross_entropy(hidden, weight, None, targets.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum",
                                                backend=backend)
        logits = output.reshape(-1, output.shape[-1])
        if logits.element_size() < 4:  # half-precision logits: reduce in fp32
            logits = logits.float()
        return ops.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                     reduction="sum", backend=backend)
    return loss_sum


def count_loss_units(targets) -> int:
    """What the mean loss divides by: tokens whose target is not ignored."""
    return int((targets != IGNORE_INDEX).sum())



FAMILY = Family(
    name="transformer", unit="token", data_kind="tokens", default_data="stdlib",
    depth_field="layers", fixed_layers=2, layers_per_depth=1,  # Embedding + L blocks + Head
    layer_factories=layer_factories, make_loss=make_loss, count_loss_units=count_loss_units,
    units_per_sample=lambda cfg: cfg.seq_len,
    input_shape=lambda cfg, rows: (rows, cfg.seq_len),
    targets_shape=lambda cfg, rows: (rows, cfg.seq_len),
    planning_defaults=lambda cfg: {"vocab": cfg.vocab or 256},  # the byte-level default data
    describe=lambda cfg: (f"{cfg.layers} blocks, d_model {cfg.d_model}, {cfg.heads} heads, "
                          f"seq {cfg.seq_len}"),
    tied_weight=tied_weight)
