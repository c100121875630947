"""AdamW with linear warm-up and cosine decay; the decay skips biases and norm weights."""
import math

import torch

import kernels


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
        return kernels.AdamW(groups, backend="triton", **kwargs)
    # Not a loop of per-tensor ops: on CUDA one fused kernel; elsewhere the foreach ops, which
    # round exactly as the loop does (the CPU fused kernel differs in the last bits, and the
    # float64 exactness tests compare against torch's default AdamW to 1e-10).
    on_cuda = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, **kwargs, fused=on_cuda, foreach=not on_cuda)
