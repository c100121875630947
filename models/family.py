"""What the trainer, the planner and the metrics know about a model family: declared once, in the
family's own file (`FAMILY = Family(...)` at the end of models/transformer.py, models/amoebanet.py).

Adding a family is one file that defines its layers and its FAMILY, an entry in models.FAMILIES,
its size presets (minipipe/presets.py: plain data, because the config may not import torch), and
its tests. Nothing outside models/ asks `cfg.model == ...`; it asks the family.
"""
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class TiedWeight:
    """One weight that two layers use, as GPT-2's output head uses the token embedding: layer
    `source_layer`'s parameter `source_param` holds it, and layer `copy_layer`'s parameter
    `copy_param` is the same weight. The trainer keeps the two one weight on any cut
    (minipipe/pipeline/tied.py); the source must be the model's first layer and the copy its last."""
    source_layer: int
    source_param: str  # a parameter name inside the layer, e.g. "tokens.weight"
    copy_layer: int
    copy_param: str

    @property
    def source_name(self) -> str:
        """The weight's one global name (in checkpoints and exports)."""
        return f"layers.{self.source_layer}.{self.source_param}"

    @property
    def copy_name(self) -> str:
        return f"layers.{self.copy_layer}.{self.copy_param}"


def untied(cfg) -> None:
    """The tied_weight of a family whose layers share no weight."""
    return None


@dataclass(frozen=True)
class Family:
    name: str
    unit: str  # what the loss averages over and throughput counts: "token" or "sample"
    data_kind: str  # the kind of --data it reads: "tokens" or "images"
    default_data: str  # --data when none is given
    depth_field: str  # the Config field that sets the depth ("layers", "cells")
    fixed_layers: int  # layers that do not repeat with the depth (embedding and head; stem, ...)
    layers_per_depth: int  # layers added by one unit of depth
    layer_factories: Callable  # (cfg, backend) -> one zero-argument constructor per global layer
    make_loss: Callable  # backend -> loss_sum(last layer's output, targets): summed over units
    count_loss_units: Callable  # targets -> how many units the mean loss divides by
    units_per_sample: Callable  # cfg -> units in one sample (tokens of a sequence; 1 image)
    input_shape: Callable  # (cfg, rows) -> shape of `rows` samples of the model's input
    targets_shape: Callable  # (cfg, rows) -> shape of their targets (int64)
    planning_defaults: Callable  # cfg -> {field: value} the default data would fill (vocab, ...)
    describe: Callable  # cfg -> the model's shape in a few words, for the planner's table
    tied_weight: Callable = untied  # cfg -> the TiedWeight two of its layers share, or None

    @property
    def reads_tokens(self) -> bool:
        """Integer token ids in, one prediction per position out: a language model."""
        return self.data_kind == "tokens"

    def smallest_depth(self, n_chunks: int) -> int:
        """The least depth whose model has at least one layer per chunk."""
        return max(1, -(-(n_chunks - self.fixed_layers) // self.layers_per_depth))
