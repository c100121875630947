"""Re-materialisation (GPipe section 2.3): keep a micro-batch's stage input, not its activations.

With recompute, the forward of micro-batch m runs without autograd and the stage stashes only
its input. Right before m's backward, the forward runs again with autograd and backprop follows
at once, so at most one micro-batch's intermediates are alive per stage, under every schedule; how many
stage inputs wait stashed is the schedule's micro-batches in flight (gpipe M, 1f1b K - stage).

Replay is exact without saving RNG state: `Stage` seeds each stochastic layer from
(seed, step, layer, micro-batch), so the recompute draws the same dropout masks. BatchNorm
running statistics were updated by the first forward, so the replay runs with them frozen.

Modes (those of GPipe / torchgpipe): `always`; `except_last`, which keeps the graph of the last
micro-batch because its backward follows its forward immediately; `never`.
"""
import torch

from minipipe.pipeline.running_stats import frozen
from minipipe.pipeline.values import map_tensors


def recomputes(mode: str, microbatch: int, n_microbatches: int) -> bool:
    if mode == "always":
        return True
    if mode == "except_last":
        return microbatch != n_microbatches - 1
    return False


def grad_leaf(value):
    """A copy of the stage input that autograd can differentiate with respect to."""
    return map_tensors(lambda t: t.detach().requires_grad_(t.is_floating_point()), value)


def recompute_forward(stage, stashed_input, step: int, microbatch: int, input_grad: bool, chunk: int = 0):
    """(input leaf, output) with the autograd graph rebuilt, replaying the original forward."""
    leaf = grad_leaf(stashed_input) if input_grad else stashed_input
    with torch.enable_grad(), frozen(stage):
        return leaf, stage(leaf, step, microbatch, chunk)
