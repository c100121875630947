"""Models as ordered lists of layers (the layer contract in ARCHITECTURE.md), one file per family.

Each family's file declares its layers and its FAMILY (models/family.py): the facts the trainer,
planner and metrics need. `layer_factories(cfg)` returns one zero-argument constructor per global
layer index. Building them under the layer contract's seeds, tying, counting parameters and
loading an export are the trainer's (minipipe/layers.py, minipipe/export.py): models/ imports
nothing from minipipe/.
"""
from typing import Callable

from torch import nn

from minipipe.models import amoebanet, transformer
from minipipe.models.family import Family, TiedWeight

FAMILIES = {f.name: f for f in (transformer.FAMILY, amoebanet.FAMILY)}  # keys: minipipe.presets.MODEL_FAMILIES


def family(cfg) -> Family:
    return FAMILIES[cfg.model]


def layer_factories(cfg, backend: str = "torch") -> list[Callable[[], nn.Module]]:
    """One constructor per global layer index (data-dependent fields must be resolved)."""
    return family(cfg).layer_factories(cfg, backend)


def loss_fn(cfg, backend: str = "torch"):
    """(output of the last layer, targets) -> summed loss over the counted units."""
    return family(cfg).make_loss(backend)


def tied_weight(cfg) -> TiedWeight | None:
    """The weight two of the model's layers share (its family declares it), or None."""
    return family(cfg).tied_weight(cfg)


def count_loss_units(cfg, targets) -> int:
    """How many units (tokens or samples) of `targets` the mean loss divides by."""
    return family(cfg).count_loss_units(targets)
