"""Rotary position embedding (RoPE, Su et al. 2021) in the rotate-half layout of Llama: the
pair a frequency rotates is (x[j], x[j + D/2]), so x -> x * cos + rotate_half(x) * sin with
rotate_half(x) = (-x[D/2:], x[:D/2]) and cos, sin (T, D) repeating their D/2 angles."""
import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_reference(x, cos, sin):
    """x (..., T, D) rotated by position: x * cos + rotate_half(x) * sin."""
    return x * cos + rotate_half(x) * sin
