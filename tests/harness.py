"""Run a few real training steps through build_run + Engine and collect what the tests compare:
losses, the first step's gradients and the final weights, all keyed by global parameter name."""
import torch
import torch.nn.functional as F

from minipipe.build import build_run
from minipipe.config import make_config
from minipipe.data import load_settled
from minipipe.layers import build_layers
from minipipe.models import registry
from minipipe.pipeline.optim import lr_at
from minipipe.seeding import derive_seed


def run_steps(n_steps: int = 1, watch: tuple = (), **cfg_values) -> dict:
    """`watch`: tensor names of this stage's state_dict recorded after every step ("watched")."""
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
    losses, watched = [], []
    for step in range(n_steps):
        inputs, targets = run.dataset.batch(step, cfg.batch_size)
        losses.append(run.engine.train_step(inputs, targets, step, lr_at(step, cfg), cfg.grad_clip)["loss"])
        watched.append({n: t.detach().clone() for n, t in run.stage.state_dict().items() if n in watch})
    weights = {n: t.detach().clone() for n, t in run.stage.state_dict().items()}
    comm = run.engine.comm  # headers posted ahead for messages that never came would be left here
    return {"losses": losses, "grads": grads, "weights": weights, "stage": run.layout.stage,
            "executed": [str(a) for a in run.engine.executed], "watched": watched,
            "headers_left": len(comm._early_headers) if comm is not None else 0}


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


def reference_steps(n_steps: int = 1, **cfg_values) -> dict:
    """Plain single-device training, independent of the engine: the layers in an nn.Sequential,
    F.cross_entropy, clip_grad_norm_ and torch's AdamW. `microbatches` > 1 only splits the
    forward (BatchNorm sees each micro-batch alone); the loss is still the mean over the batch.
    Dropout draws its masks under the documented key: the CPU generator seeded with
    derive_seed(seed, "dropout", step, layer, micro-batch) right before each layer with dropout."""
    cfg, dataset = load_settled(make_config(**cfg_values))
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    n_layers = len(registry.layer_factories(cfg))
    model = torch.nn.Sequential(*build_layers(cfg, range(n_layers)).values()).to(dtype)
    named = {f"layers.{n}": p for n, p in model.named_parameters()}
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    losses, grads = [], {}
    for step in range(n_steps):
        inputs, targets = dataset.batch(step, cfg.batch_size)
        if inputs.is_floating_point():
            inputs = inputs.to(dtype)
        total = 0.0
        for j, (x, y) in enumerate(zip(inputs.chunk(cfg.microbatches), targets.chunk(cfg.microbatches))):
            logits = x
            for i, layer in enumerate(model):
                if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules()):
                    torch.manual_seed(derive_seed(cfg.seed, "dropout", step, i, j))
                logits = layer(logits)
            logits = F.linear(*logits) if isinstance(logits, tuple) else logits  # a training head hands over (hidden, weight)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   reduction="sum") / targets.numel()
            loss.backward()
            total += loss.item()
        losses.append(total)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not grads:  # after clipping, as run_steps records them
            grads = {n: p.grad.detach().clone() for n, p in named.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights = {f"layers.{n}": t.detach().clone() for n, t in model.state_dict().items()}
    return {"losses": losses, "grads": grads, "weights": weights}
