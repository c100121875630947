"""The hot ops, each as a Triton kernel and a plain-PyTorch reference, behind one dispatch API.

`backend` is 'triton', 'torch' or 'auto' (triton on CUDA, torch elsewhere). Every function is
differentiable on both backends; the torch path is stock PyTorch's fastest op (and the path the
float64 exactness tests run on CPU); each op's `*_reference` is the independent check. Without a
GPU the triton backend runs through Triton's CPU interpreter.

`ops.<op>` is always a dispatch function: an op's module is named for the implementation it holds
(`flash_attention`, `fused_cross_entropy`, `layernorm`, `rmsnorm`, `rope`, `swiglu`, `batchnorm`,
`gelu`, `adamw`), never after a dispatch function, so `minipipe.kernels.<module>` and `ops.<op>`
never name the same word.
"""
import torch
import torch.nn.functional as F

from minipipe.kernels import (
    batchnorm,
    flash_attention,
    fused_cross_entropy,
    gelu,
    layernorm,
    rmsnorm,
    rope,
    swiglu,
)
from minipipe.kernels.adamw import AdamW
from minipipe.kernels.batchnorm import update_running_stats
from minipipe.kernels.runtime import resolve_backend

__all__ = ["AdamW", "attention", "batch_norm", "batch_norm_eval", "bias_gelu", "cross_entropy",
           "layer_norm", "linear_cross_entropy", "resolve_backend", "rms_norm", "rotary_embedding",
           "silu_and_mul", "update_running_stats"]


def _triton(backend: str, x: torch.Tensor) -> bool:
    return resolve_backend(backend, x.device) == "triton"


def layer_norm(x, weight, bias, eps, backend):
    """LayerNorm over the last dim with fp32 statistics."""
    if _triton(backend, x):
        return layernorm.LayerNormFunction.apply(x, weight, bias, eps)
    return layernorm.layer_norm_reference(x, weight, bias, eps)


def attention(q, k, v, causal, backend):
    """softmax(q k^T / sqrt(D) [+ causal mask]) v for q shaped (B, H, T, D) and k, v shaped
    (B, H_kv, T, D), H a multiple of H_kv: query head h reads key/value head h // (H / H_kv)
    (grouped-query attention; H_kv = H is multi-head). The torch path is SDPA (flash or
    memory-efficient on a GPU; `enable_gqa` lets it read the shared heads without a repeated copy
    where its kernel can); `flash_attention.attention_reference`, the explicit softmax, is what
    the tests check both against."""
    if _triton(backend, q):
        return flash_attention.FlashAttentionFunction.apply(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def rms_norm(x, weight, eps, backend):
    """RMSNorm over the last dim with float32 statistics: weight * (x / rms(x)) (Llama's)."""
    if _triton(backend, x):
        return rmsnorm.RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotary_embedding(q, k, cos, sin, backend):
    """Rotary position embedding of q (B, H, T, D) and k (B, H_kv, T, D) by cos, sin (T, D) in the
    rotate-half layout (Llama's): x * cos + rotate_half(x) * sin. Torch has no fused op: its
    path is the reference's elementwise formula."""
    if _triton(backend, q):
        return rope.RotaryEmbeddingFunction.apply(q, k, cos, sin)
    return rope.rope_reference(q, cos, sin), rope.rope_reference(k, cos, sin)


def silu_and_mul(gate, up, backend):
    """silu(gate) * up, the SwiGLU MLP's gated activation."""
    if _triton(backend, gate):
        return swiglu.SwiGLUFunction.apply(gate, up)
    return swiglu.swiglu_reference(gate, up)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", backend="auto"):
    """Softmax cross-entropy of logits (N, V) against int64 targets (N,); 'mean' divides by the
    number of targets that are not ignore_index."""
    fused_cross_entropy.check_reduction(reduction)
    if _triton(backend, logits):
        return fused_cross_entropy.CrossEntropyFunction.apply(logits, targets, ignore_index,
                                                              reduction)
    return fused_cross_entropy.cross_entropy_reference(logits, targets, ignore_index, reduction)


def linear_cross_entropy(hidden, weight, bias, targets, ignore_index=-100, reduction="mean",
                         backend="auto", chunk_size=None):
    """cross_entropy(hidden @ weight.T + bias, targets); the triton path goes through the tokens
    chunk_size rows at a time so the (N, V) logits are never stored whole."""
    fused_cross_entropy.check_reduction(reduction)
    if _triton(backend, hidden):
        return fused_cross_entropy.LinearCrossEntropyFunction.apply(hidden, weight, bias, targets,
                                                                    ignore_index, reduction,
                                                                    chunk_size)
    return fused_cross_entropy.linear_cross_entropy_reference(hidden, weight, bias, targets,
                                                              ignore_index, reduction)


def bias_gelu(x, bias, approximate, backend):
    """gelu(x + bias), bias over the last dim (or None); approximate is 'tanh' or 'none'."""
    gelu.check_approximate(approximate)
    if _triton(backend, x):
        return gelu.BiasGeluFunction.apply(x, bias, approximate)
    return gelu.bias_gelu_reference(x, bias, approximate)


def batch_norm(x, weight, bias, eps, relu, backend):
    """Training-mode BatchNorm over channel dim 1 (optionally followed by ReLU).
    Returns (y, batch_mean, batch_var_biased); the caller updates running statistics."""
    if _triton(backend, x):
        return batchnorm.BatchNormFunction.apply(x, weight, bias, eps, relu)
    return batchnorm.batch_norm_reference(x, weight, bias, eps, relu)


def batch_norm_eval(x, weight, bias, running_mean, running_var, eps, relu, backend):
    """Eval-mode BatchNorm with the running statistics (optionally followed by ReLU)."""
    if _triton(backend, x):
        return batchnorm.BatchNormEvalFunction.apply(x, weight, bias, running_mean, running_var,
                                                     eps, relu)
    return batchnorm.batch_norm_eval_reference(x, weight, bias, running_mean, running_var, eps,
                                               relu)
