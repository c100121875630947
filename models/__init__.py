"""Models as ordered lists of layers (the layer contract in ARCHITECTURE.md).

`layer_factories(cfg)` returns one zero-argument constructor per global layer index;
`build_layers(cfg, indices)` builds some of them, each under its own seed derived from
(cfg.seed, "init", i), so any cut of the model holds bitwise the same weights.
`load_exported(path)` rebuilds the whole trained model from `python -m minipipe.export` output.
"""
from typing import Callable, Iterable

import torch
from torch import nn

from minipipe.seeding import derive_seed
from models import amoebanet, transformer

FAMILIES = {"transformer": transformer, "amoebanet": amoebanet}  # keys: minipipe.presets.MODEL_FAMILIES


def layer_factories(cfg, backend: str = "torch") -> list[Callable[[], nn.Module]]:
    """One constructor per global layer index (data-dependent fields must be resolved)."""
    return FAMILIES[cfg.model].layer_factories(cfg, backend)


def build_layers(cfg, indices: Iterable[int], backend: str = "torch") -> dict[int, nn.Module]:
    """Layers `indices`, initialised from (seed, layer index) only, in float32 on the CPU."""
    factories = layer_factories(cfg, backend)
    layers = {}
    for i in indices:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init", i))
            layers[i] = factories[i]()
    return layers


def layer_param_numels(cfg) -> list[list[int]]:
    """Element count of every parameter tensor, per layer, built on the meta device (no memory)."""
    with torch.device("meta"):
        return [[p.numel() for p in make().parameters()] for make in layer_factories(cfg)]


def count_layer_params(cfg) -> list[int]:
    """Parameters per layer."""
    return [sum(numels) for numels in layer_param_numels(cfg)]


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
    cfg = make_config(**json.loads((directory / EXPORTED_CONFIG).read_text()))
    layers = build_layers(cfg, range(len(layer_factories(cfg))))
    model = nn.Sequential(*layers.values()).to(PARAM_DTYPES[cfg.dtype])
    tensors = load_file(directory / EXPORTED_WEIGHTS)
    model.load_state_dict({name.removeprefix("layers."): t for name, t in tensors.items()})
    return cfg, model.eval()
