"""Run a few real training steps through build_run + Engine and collect what the tests compare:
losses, the first step's gradients and the final weights, all keyed by global parameter name."""
import torch

from minipipe.build import build_run
from minipipe.config import make_config


def run_steps(n_steps: int = 1, **cfg_values) -> dict:
    cfg = make_config(**cfg_values)
    run = build_run(cfg)
    names = {id(p): n for n, p in run.stage.named_parameters()}
    grads = {}
    real_step = run.optimizer.step

    def recording_step(*args, **kwargs):
        if not grads:
            for group in run.optimizer.param_groups:
                for p in group["params"]:
                    grads[names[id(p)]] = p.grad.detach().clone()
        return real_step(*args, **kwargs)

    run.optimizer.step = recording_step
    losses = []
    for step in range(n_steps):
        inputs, targets = run.dataset.batch(step, cfg.batch_size)
        losses.append(run.engine.train_step(inputs, targets, step, cfg.lr, cfg.grad_clip)["loss"])
    weights = {n: t.detach().clone() for n, t in run.stage.state_dict().items()}
    return {"losses": losses, "grads": grads, "weights": weights, "stage": run.layout.stage,
            "executed": [str(a) for a in run.engine.executed]}


def assert_close_tensors(actual: dict, expected: dict, rtol: float, what: str) -> None:
    """Every tensor of `expected` present in `actual` and equal to `rtol` relative (norm-wise)."""
    assert set(actual) == set(expected), f"{what}: names differ: {set(actual) ^ set(expected)}"
    for name, ref in expected.items():
        err = (actual[name].double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)
        assert err <= rtol, f"{what}: {name} differs by {float(err):.3e} relative"


def merge_stages(results: list) -> dict:
    merged = {}
    for key in ("grads", "weights"):
        merged[key] = {}
        for result in results:
            merged[key].update(result[key])
    merged["losses"] = results[0]["losses"]
    return merged
