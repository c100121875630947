"""AdamW with linear warm-up and cosine decay (the decay skips biases and norm weights), and the
synchronous update the engine runs after the drain: `update` unscales, clips and steps."""
import math
from dataclasses import dataclass

import torch

from minipipe.errors import MinipipeError
from minipipe.kernels import ops


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based): warm-up, then cosine to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_optimizer(module: torch.nn.Module, cfg, backend: str) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if backend == "triton":
        return ops.AdamW(groups, backend="triton", **kwargs)
    # Not a loop of per-tensor ops: on CUDA one fused kernel; elsewhere the foreach ops, which
    # round exactly as the loop does (the CPU fused kernel differs in the last bits, and the
    # float64 exactness tests compare against torch's default AdamW to 1e-10).
    on_cuda = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, **kwargs, fused=on_cuda, foreach=not on_cuda)


# ---- the synchronous update: loss scaling, clipping, the optimizer step ----------------------
class DivergedError(MinipipeError):
    """A float32/float64 step produced a non-finite gradient norm: training diverged."""


@dataclass
class LossScale:
    """Dynamic loss scaling for float16 autocast, whose small gradients would underflow: the
    loss is multiplied by `scale` before backward; an overflow halves it and skips the step,
    GROWTH_INTERVAL finite steps double it. 1.0 (never changed) for the other dtypes."""
    scale: float = 1.0
    steps_at_scale: int = 0
    dynamic: bool = False

    GROWTH_INTERVAL = 2000


def update(optimizer, params, grad_norm: float, loss: float, step: int, lr: float, grad_clip: float,
           loss_scale: LossScale) -> bool:
    """Unscale, clip by the global norm and step; True if the step was skipped (float16 overflow).
    grad_norm: the whole model's gradient norm divided by the loss scale, the same on every rank
    (so every rank takes the same branch)."""
    if not math.isfinite(grad_norm):
        if not loss_scale.dynamic:
            raise DivergedError(f"step {step}: the gradient norm is {grad_norm} (loss {loss}); training "
                                f"diverged. Lower --lr, raise --warmup, keep --grad-clip on, or resume "
                                f"from an earlier checkpoint.")
        optimizer.zero_grad(set_to_none=True)
        loss_scale.scale, loss_scale.steps_at_scale = loss_scale.scale / 2, 0
        return True
    factor = 1.0 / loss_scale.scale  # unscale (float16) and clip in one multiply
    if grad_clip > 0:
        factor *= min(1.0, grad_clip / (grad_norm + 1e-6))  # torch's clip_grad_norm_ formula
    if factor != 1.0:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_scale.steps_at_scale += 1
    if loss_scale.dynamic and loss_scale.steps_at_scale == LossScale.GROWTH_INTERVAL:
        loss_scale.scale, loss_scale.steps_at_scale = loss_scale.scale * 2, 0
    return False
