"""Llama beside the Transformer of the same parameter count on the CPU (--kernels torch), in one run.

    python bench/llama_cpu.py                       # the tiny presets, 10 timed steps each
    python bench/llama_cpu.py --preset small --steps 5

The Transformer takes the preset as it is; the Llama takes the preset's Llama shape with the
SwiGLU width (--ffn-dim) chosen so that its parameter count is the closest to the Transformer's.
Both train the real step (build_run + Engine.train_step, one process, K = 1) on the same data;
step i of both runs back to back before step i+1, so a change in machine load hits both alike.
Prints a markdown table: parameters, median step time, tokens/s.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.build import build_run  # noqa: E402
from minipipe.config import make_config  # noqa: E402
from minipipe.layers import count_layer_params  # noqa: E402
from minipipe.pipeline.optim import lr_at  # noqa: E402


def matched_llama(common: dict, preset: str, target: int):
    """The Llama of `preset` whose --ffn-dim makes its parameter count closest to `target`."""
    def params(ffn):
        return sum(count_layer_params(make_config(**common, model="llama", preset=preset, ffn_dim=ffn), False))
    per_unit = params(2) - params(1)  # each unit of width adds 3 x d_model weights per block
    ffn = max(1, round(1 + (target - params(1)) / per_unit))
    return make_config(**common, model="llama", preset=preset, ffn_dim=ffn)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    common = dict(data="synthetic", batch_size=args.batch_size, microbatches=1, kernels="torch",
                  device="cpu", dtype="float32", wandb="disabled", vocab=256)
    transformer = make_config(**common, model="transformer", preset=args.preset)
    target = sum(count_layer_params(transformer, False))
    configs = {"transformer": transformer, "llama": matched_llama(common, args.preset, target)}
    runs = {name: build_run(cfg) for name, cfg in configs.items()}
    times = {name: [] for name in runs}
    for step in range(args.warmup + args.steps):
        for name, run in runs.items():
            cfg = run.cfg
            inputs, targets = run.dataset.batch(step, cfg.batch_size)
            started = time.perf_counter()
            run.engine.train_step(inputs, targets, step, lr_at(step, cfg), cfg.grad_clip)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    print(f"CPU, --kernels torch, float32, batch {args.batch_size} x seq {transformer.seq_len}, "
          f"median of {args.steps} steps after {args.warmup}, interleaved; OMP_NUM_THREADS={threads}\n")
    print("| model | shape | parameters | step (ms) | tokens/s |\n|---|---|---|---|---|")
    for name, cfg in configs.items():
        median = statistics.median(times[name])
        shape = f"L{cfg.layers} d{cfg.d_model} H{cfg.heads}" + (
            f" kv{cfg.kv_heads} ffn{cfg.ffn_dim}" if name == "llama" else " ffn{}".format(4 * cfg.d_model))
        print(f"| {name} | {shape} | {sum(count_layer_params(cfg, False)):,} | {median * 1e3:.1f} | "
              f"{cfg.batch_size * cfg.seq_len / median:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
