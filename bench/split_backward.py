"""What splitting a chunk's backward costs: I (input gradient) + W (weight gradients) against the
fused backward of the same chunk, same weights and micro-batch, alternating call by call.

    python bench/split_backward.py                        # every family at its default shapes
    python bench/split_backward.py --model transformer --repeats 40
    python bench/split_backward.py --model llama --shape 8,256,128,4

A shape is blocks,width,seq_len,rows for the Transformer and Llama (a chunk of `blocks` blocks),
cells,filters,image_size,rows for AmoebaNet (the chunk is every cell). Prints one row per
(family, shape): the median milliseconds of fused, I, W over --repeats pairs, the median
of I + W over that of fused, the 25th-75th percentile of the pairs' ratios (the spread), and the median minor
page faults of one backward of each kind (glibc hands freed memory back to the kernel and the
next allocation faults it in again: the split keeps more memory alive from I to W, so it faults
more; --keep-freed-memory has glibc keep freed memory instead, for both contenders alike).
The forward is rebuilt before each backward and is not timed. One thread (a pipeline rank's), and
the times are that thread's CPU time (the autograd engine runs a CPU graph on the calling thread),
so time the machine's other processes take from it does not count; on a shared machine they still
evict its caches, so give the load average with the figures.
"""
import argparse
import ctypes
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minipipe.config import make_config
from minipipe.layers import build_layers
from minipipe.models import registry
from minipipe.pipeline import values
from minipipe.pipeline.recompute import grad_leaf
from minipipe.pipeline.split_backward import backward_input, backward_weight

SHAPES = {"transformer": [(4, 256, 128, 4), (2, 128, 64, 4), (1, 64, 16, 4)],
          "llama": [(4, 256, 128, 4), (2, 128, 64, 4)],
          "amoebanet": [(1, 16, 32, 4), (1, 4, 16, 4)]}


def _config(model, shape):
    a, b, c, _ = shape
    if model == "amoebanet":
        return make_config(model=model, cells=a, filters=b, image_size=c, channels=3, classes=10, data="synthetic")
    heads = max(1, b // 64)
    extra = dict(kv_heads=max(1, heads // 2), ffn_dim=b * 11 // 4) if model == "llama" else {}
    return make_config(model=model, layers=a, d_model=b, heads=heads, max_seq_len=c, vocab=256,
                       data="synthetic", dropout=0.0, **extra)


def keep_freed_memory():
    """glibc: never hand freed heap memory back to the kernel, and serve large blocks from the heap
    too (mallopt M_TRIM_THRESHOLD, M_MMAP_THRESHOLD), so a freed block is reused without faults."""
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(-1, 2**30) and libc.mallopt(-3, 2**30)):
        raise RuntimeError("mallopt refused the thresholds")


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(model, shape, repeats):
    """{'fused', 'I', 'W', 'I + W', 'ratio', 'faults fused', 'faults split'}: one list of `repeats` values each."""
    cfg = _config(model, shape)
    n = len(registry.layer_factories(cfg))
    layers = build_layers(cfg, range(n))
    chunk = torch.nn.Sequential(*[layers[i] for i in range(1, n - 1)]).train()  # all but embedding/stem and head
    family = registry.family(cfg)
    input_shape = family.input_shape(cfg, shape[3])
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, cfg.vocab, input_shape, generator=generator) if family.reads_tokens
             else torch.randn(input_shape, generator=generator))
    with torch.no_grad():
        value = layers[0](batch)  # the chunk's input, as the previous stage sends it

    def forward():
        leaf = grad_leaf(value)
        outputs = [o for o in values.as_tuple(chunk(leaf)) if o.requires_grad]
        grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1)) for o in outputs]
        return outputs, grads, [t for t in values.as_tuple(leaf) if t.requires_grad]

    runs = {k: [] for k in ("fused", "I", "W", "I + W", "ratio", "faults fused", "faults split")}
    for i in range(repeats + 2):  # two warm-up pairs
        chunk.zero_grad(set_to_none=True)
        outputs, grads, _ = forward()
        faults, started = _minor_faults(), time.thread_time()
        torch.autograd.backward(outputs, grads)
        fused, fused_faults = time.thread_time() - started, _minor_faults() - faults
        chunk.zero_grad(set_to_none=True)
        outputs, grads, inputs = forward()
        faults, started = _minor_faults(), time.thread_time()
        pending = backward_input(outputs, grads, inputs)
        middle = time.thread_time()
        backward_weight(pending)
        ended = time.thread_time()
        if i >= 2:
            for key, v in (("fused", fused), ("I", middle - started), ("W", ended - middle),
                           ("I + W", ended - started), ("ratio", (ended - started) / fused), ("faults fused", fused_faults),
                           ("faults split", _minor_faults() - faults)):
                runs[key].append(v)
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(SHAPES), action="append", help="(repeatable) default: all")
    parser.add_argument("--shape", action="append", help="a,b,c,rows (repeatable; see the docstring)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--keep-freed-memory", action="store_true", help="glibc keeps freed memory (see the docstring)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.keep_freed_memory:
        keep_freed_memory()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.repeats} alternating pairs "
          f"after 2 warm-up pairs; ms are medians; spread = 25th-75th percentile of the pairs' ratios"
          + ("; glibc keeps freed memory" if args.keep_freed_memory else ""))
    print("| family | shape | fused ms | I ms | W ms | (I + W) / fused | spread | page faults fused / split |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.model or list(SHAPES):
        for shape in ([tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else SHAPES[model]):
            runs = measure(model, shape, args.repeats)
            ms = {k: statistics.median(runs[k]) * 1e3 for k in ("fused", "I", "W", "I + W")}
            quartiles = statistics.quantiles(runs["ratio"], n=4)
            print(f"| {model} | {','.join(map(str, shape))} | {ms['fused']:.2f} | {ms['I']:.2f} | {ms['W']:.2f} "
                  f"| {ms['I + W'] / ms['fused']:.3f} | {quartiles[0]:.3f}-{quartiles[2]:.3f} "
                  f"| {statistics.median(runs['faults fused']):.0f} / {statistics.median(runs['faults split']):.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
