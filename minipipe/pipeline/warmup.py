"""Run every kernel a stage will use once, before the stage's first exchange.

The first call of a Triton kernel compiles it, and an autotuned one times every config; cuBLAS
and cuDNN pick their algorithms on first use too. Inside step 0 that time adds up along the
pipeline (stage s waits for the compiles of stages 0..s-1 before its own), and `--timeout` bounds
every wait: a deep pipeline of slow compiles could time out on a healthy run. So each stage runs
a forward and a backward of each of its chunks on a zero micro-batch of the right shape
(minipipe.layers.chunk_inputs, put together by minipipe.build.warm_up_run) on its own, before any rank waits on another, and leaves nothing
behind: gradients are cleared, running statistics frozen, every RNG restored.
"""
import time

import torch

from minipipe.pipeline import running_stats
from minipipe.pipeline.recompute import grad_leaf
from minipipe.pipeline.spec import PipelineSpec
from minipipe.pipeline.values import as_tuple


def warm_up(engine, chunk_inputs: list, targets: torch.Tensor, *, spec: PipelineSpec) -> float:
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
                if spec.chunks_on(engine.layout.stage)[v] == spec.n_chunks - 1:
                    output = engine.loss_sum(output, targets)
            outputs = [o for o in as_tuple(output) if o.requires_grad]
            if outputs:
                torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    for p in stage.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # once, at start-up: the compiles are done when this returns
    return time.perf_counter() - start
