"""Derived seeds: every random stream in minipipe is a pure function of named parts.

Weights of layer i come from (seed, "init", i); the batch of step s from (seed, "train", s);
the dropout mask of layer i on micro-batch m at step s from (seed, "dropout", s, i, m).
None of them depends on which process computes it, so K, M-splitting and re-materialisation
see the same numbers.
"""
import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
