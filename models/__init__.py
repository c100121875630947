"""Models as ordered lists of layers (the layer contract in ARCHITECTURE.md).

`layer_factories(cfg)` returns one zero-argument constructor per global layer index;
`build_layers(cfg, indices)` builds some of them, each under its own seed derived from
(cfg.seed, "init", i), so any cut of the model holds bitwise the same weights.
`load_exported(path)` rebuilds the whole trained model from `python -m minipipe.export` output.
"""
from typing import Callable, Iterable

import torch
from torch import nn

from minipipe import tied
from minipipe.seeding import derive_seed
from models import amoebanet, transformer

FAMILIES = {"transformer": transformer, "amoebanet": amoebanet}  # keys: minipipe.presets.MODEL_FAMILIES


def layer_factories(cfg, backend: str = "torch") -> list[Callable[[], nn.Module]]:
    """One constructor per global layer index (data-dependent fields must be resolved)."""
    return FAMILIES[cfg.model].layer_factories(cfg, backend)


def build_layers(cfg, indices: Iterable[int], backend: str = "torch") -> dict[int, nn.Module]:
    """Layers `indices`, initialised from (seed, layer index) only, in float32 on the CPU.
    A tied head (--tie-embeddings) shares layer 0's token matrix when both are built here, and
    otherwise holds a copy of it made from layer 0's seed: equal on every stage, for any cut."""
    factories = layer_factories(cfg, backend)

    def build(i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init", i))
            return factories[i]()
    layers = {i: build(i) for i in indices}
    head = tied.head_index(cfg) if tied.is_tied(cfg) else None
    if head in layers:
        source = layers[0] if 0 in layers else build(0)
        layers[head].proj.weight = source.tokens.weight if 0 in layers else nn.Parameter(
            source.tokens.weight.detach().clone())
    return layers


def layer_param_numels(cfg) -> list[list[int]]:
    """Element count of every parameter tensor of the whole model, per layer, in the whole model's
    parameter order, built on the meta device (no memory). A tied weight counts once (in layer 0)."""
    with torch.device("meta"):
        return [[p.numel() for name, p in make().named_parameters()
                 if not (tied.is_tied(cfg) and i == tied.head_index(cfg) and name == tied.COPY_PARAM)]
                for i, make in enumerate(layer_factories(cfg))]


def count_layer_params(cfg) -> list[int]:
    """Parameters each layer holds. A tied head counts its copy of the embedding (on a stage of
    its own that copy is real memory); the model's total counts it once: see minipipe/tied.py."""
    with torch.device("meta"):
        return [sum(p.numel() for p in make().parameters()) for make in layer_factories(cfg)]


def loss_fn(cfg, backend: str = "torch"):
    """(output of the last layer, targets) -> summed loss over the counted units."""
    return FAMILIES[cfg.model].make_loss(backend)


def count_loss_units(cfg, targets) -> int:
    """How many units (tokens or samples) of `targets` the mean loss divides by."""
    return FAMILIES[cfg.model].count_loss_units(targets)


def load_exported(path) -> tuple:
    """(Config, nn.Sequential of every layer) from a `python -m minipipe.export` directory, for
    inference or analysis on one device: element i is global layer i, with its trained weights
    and buffers, in eval mode."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from minipipe.build import PARAM_DTYPES
    from minipipe.config import make_config
    from minipipe.export import EXPORTED_CONFIG, EXPORTED_WEIGHTS
    directory = Path(path)
    cfg = make_config(**{**json.loads((directory / EXPORTED_CONFIG).read_text()), "init_from": None})
    layers = build_layers(cfg, range(len(layer_factories(cfg))))
    model = nn.Sequential(*layers.values()).to(PARAM_DTYPES[cfg.dtype])
    tensors = tied.with_copy(cfg, load_file(directory / EXPORTED_WEIGHTS))  # a tied weight is stored once
    model.load_state_dict({name.removeprefix("layers."): t for name, t in tensors.items()})
    return cfg, model.eval()
