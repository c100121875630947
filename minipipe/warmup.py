"""Run every kernel a stage will use once, before the stage's first exchange.

The first call of a Triton kernel compiles it, and an autotuned one times every config; cuBLAS
and cuDNN pick their algorithms on first use too. Inside step 0 that time adds up along the
pipeline (stage s waits for the compiles of stages 0..s-1 before its own), and `--timeout` bounds
every wait: a deep pipeline of slow compiles could time out on a healthy run. So each stage runs
a forward and a backward of each of its chunks on a zero micro-batch of the right shape
(minipipe.layers.chunk_inputs) on its own, before any rank waits on another, and leaves nothing
behind: gradients are cleared, running statistics frozen, every RNG restored.
"""
import time

import torch

from minipipe.models import registry
from minipipe import running_stats
from minipipe.layers import chunk_inputs
from minipipe.recompute import grad_leaf
from minipipe.values import as_tuple


def warm_up_run(run) -> float:
    """warm_up for a built run: one micro-batch of its shape on each of this rank's chunks."""
    cfg, device = run.cfg, run.layout.device
    rows = cfg.batch_size // cfg.dp // cfg.microbatches
    param_dtype = next(run.stage.parameters()).dtype
    targets = torch.zeros(registry.family(cfg).targets_shape(cfg, rows), dtype=torch.long, device=device)
    values = chunk_inputs(cfg, run.stage.chunks, rows, param_dtype, device, run.engine.autocast_dtype)
    return warm_up(run.engine, values, targets)


def warm_up(engine, chunk_inputs: list, targets: torch.Tensor) -> float:
    """Seconds spent; `chunk_inputs[v]` is a value shaped like chunk v's micro-batch input,
    `targets` one micro-batch's targets (for the loss on the model's last chunk)."""
    start = time.perf_counter()
    stage, device = engine.stage, engine.device
    stage.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            running_stats.frozen(stage):
        for v, value in enumerate(chunk_inputs):
            leaf = grad_leaf(value)
            with engine.autocast():
                output = stage(leaf, 0, 0, v)
                if v * engine.layout.n_stages + engine.layout.stage == engine.last_chunk:
                    output = engine.loss_sum(output, targets)
            outputs = [o for o in as_tuple(output) if o.requires_grad]
            if outputs:
                torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    for p in stage.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # once, at start-up: the compiles are done when this returns
    return time.perf_counter() - start
