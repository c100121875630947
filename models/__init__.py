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
from minipipe.errors import ConfigError
from minipipe.seeding import derive_seed
from models import amoebanet, transformer

FAMILIES = {"transformer": transformer, "amoebanet": amoebanet}

PRESETS = {
    "transformer": {
        "tiny": dict(layers=4, d_model=128, heads=4, max_seq_len=128),
        "small": dict(layers=6, d_model=384, heads=6, max_seq_len=256),
        # The GPipe paper's Transformer shape (Table 1: d_model 2048, d_ff 8192, 32 heads).
        "gpipe": dict(layers=24, d_model=2048, heads=32, max_seq_len=1024, vocab=32000),
    },
    "amoebanet": {
        "tiny": dict(cells=1, filters=8, image_size=32),
        "small": dict(cells=2, filters=32, image_size=32),
        # AmoebaNet-D(18, 256) at 224x224 (L = 3 groups x 6 normal cells), as in GPipe's image runs.
        "gpipe": dict(cells=6, filters=256, image_size=224, classes=1000),
    },
}


def apply_preset(cfg) -> None:
    """Fill every model field the user left unset from the preset."""
    if cfg.model not in FAMILIES:
        raise ConfigError(f"--model {cfg.model!r}: choose one of {', '.join(FAMILIES)}")
    if cfg.init_from:  # the imported model's config.json sets the shape before any preset
        from minipipe.hf_gpt2 import apply_config
        apply_config(cfg)
    if cfg.tie_embeddings and cfg.model != "transformer":
        raise ConfigError(f"--tie-embeddings ties a Transformer's embedding and head; --model is {cfg.model!r}")
    cfg.tie_embeddings = bool(cfg.tie_embeddings)
    presets = PRESETS[cfg.model]
    if cfg.preset not in presets:
        raise ConfigError(f"--preset {cfg.preset!r} is not a {cfg.model} preset; "
                          f"choose one of {', '.join(presets)}")
    for name, value in presets[cfg.preset].items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.model == "transformer" and cfg.seq_len is None:
        cfg.seq_len = cfg.max_seq_len


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
