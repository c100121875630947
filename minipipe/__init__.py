"""minipipe: a compact GPipe trainer (fill-drain pipeline, re-materialisation, Triton kernels)."""
