"""What splitting a chunk's backward costs: I (input gradient) + W (weight gradients) against the
fused backward of the same chunk, same weights and micro-batch, alternating call by call.

    python bench/split_backward.py                       # GPT shape: 4 blocks, d=256, T=128, rows 4
    python bench/split_backward.py --blocks 8 --rows 8 --repeats 30

Prints the median milliseconds of fused, I, W and I + W over --repeats, and (I + W) / fused.
The forward is rebuilt before each backward and is not timed. One thread (a pipeline rank's).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minipipe.config import make_config
from minipipe.layers import build_layers
from minipipe.pipeline.recompute import grad_leaf
from minipipe.pipeline.split_backward import backward_input, backward_weight


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rows", type=int, default=4, help="samples per micro-batch")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = make_config(model="transformer", layers=args.blocks, d_model=args.d_model, heads=args.d_model // 64,
                      max_seq_len=args.seq_len, vocab=256, data="synthetic", dropout=0.0)
    chunk = torch.nn.Sequential(*build_layers(cfg, range(1, args.blocks + 1)).values())
    x = torch.randn(args.rows, args.seq_len, args.d_model)
    grad = torch.randn_like(x)

    def fused():
        out = chunk(leaf := grad_leaf(x))
        started = time.perf_counter()
        torch.autograd.backward(out, grad)
        return time.perf_counter() - started, 0.0, leaf

    def split():
        out = chunk(leaf := grad_leaf(x))
        started = time.perf_counter()
        pending = backward_input([out], [grad], [leaf])
        middle = time.perf_counter()
        backward_weight(pending)
        return middle - started, time.perf_counter() - middle, leaf

    times = {"fused": [], "I": [], "W": [], "I + W": []}
    for i in range(args.repeats + 2):
        chunk.zero_grad(set_to_none=True)
        f, _, _ = fused()
        chunk.zero_grad(set_to_none=True)
        b, w, _ = split()
        if i >= 2:  # warm-up
            times["fused"].append(f)
            times["I"].append(b)
            times["W"].append(w)
            times["I + W"].append(b + w)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{args.blocks} blocks, d={args.d_model}, T={args.seq_len}, {args.rows} rows, "
          f"median of {args.repeats}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in medians.items())
          + f"; (I + W) / fused = {medians['I + W'] / medians['fused']:.3f}")


if __name__ == "__main__":
    main()
