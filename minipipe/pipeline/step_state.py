"""The engine's per-step state (minipipe/pipeline/engine.py): one value, made by Engine.begin."""
from dataclasses import dataclass, field

import torch


@dataclass
class StepState:
    """What one step holds between actions, keyed by (the rank's local chunk, micro-batch); names
    say which way each value flows. Everything is emptied by the step's own actions."""
    units: int  # counted units of the global batch: the loss normaliser
    batch_inputs: list | None  # this replica's micro-batch inputs (only where the first chunk runs)
    targets: list | None  # this replica's micro-batch targets (only where the last chunk runs)
    sizes: list[int]  # rows of each micro-batch
    act_from_prev: dict = field(default_factory=dict)  # received chunk inputs awaiting their forward
    act_to_next: dict = field(default_factory=dict)  # chunk outputs awaiting send_act
    sent_like: dict = field(default_factory=dict)  # shape of each sent activation: its gradient's
    stashed_inputs: dict = field(default_factory=dict)  # recompute: chunk inputs kept for backward
    graphs: dict = field(default_factory=dict)  # no recompute: (input leaf, output) with autograd graph
    grad_from_next: dict = field(default_factory=dict)  # received gradients of chunk outputs
    grad_to_prev: dict = field(default_factory=dict)  # gradients of chunk inputs awaiting send_grad
    weight_grads_pending: dict = field(default_factory=dict)  # split backward: what W needs from I
    # sum of this rank's micro-batch losses (last chunk only), float64 on the device: read once per
    # step, after the grad-norm all-reduce that carries it (no host wait per micro-batch)
    loss_total: torch.Tensor | None = None

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().double()  # the same float64 sums as Python floats, in the same order
        self.loss_total = loss if self.loss_total is None else self.loss_total + loss
