"""A run's layers under the layer contract: layer i initialised from (seed, "init", i) only, so
building one stage's layers alone gives bitwise the weights of the whole model; the tied head's
weight (minipipe/pipeline/tied.py); parameter counts and chunk input shapes from meta-device layers (no
memory)."""
from contextlib import nullcontext
from typing import Iterable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from minipipe.models import registry
from minipipe.pipeline.values import map_tensors
from minipipe.seeding import derive_seed


def build_layers(cfg, indices: Iterable[int], backend: str = "torch") -> dict[int, nn.Module]:
    """Layers `indices`, initialised from (seed, layer index) only, in float32 on the CPU.
    A tied head (--tie-embeddings) shares layer 0's token matrix when both are built here, and
    otherwise holds a copy of it made from layer 0's seed: equal on every stage, for any cut."""
    factories = registry.layer_factories(cfg, backend)

    def build(i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init", i))
            return factories[i]()
    layers = {i: build(i) for i in indices}
    tie = registry.tied_weight(cfg)
    if tie is not None and tie.copy_layer in layers:
        shared = tie.source_layer in layers
        weight = (layers[tie.source_layer] if shared else build(tie.source_layer)).get_parameter(tie.source_param)
        owner, _, name = tie.copy_param.rpartition(".")
        setattr(layers[tie.copy_layer].get_submodule(owner), name,
                weight if shared else nn.Parameter(weight.detach().clone()))
    return layers


def layer_param_numels(cfg) -> list[list[int]]:
    """Element count of every parameter tensor of the whole model, per layer, in the whole model's
    parameter order, built on the meta device (no memory). A tied weight counts once (in layer 0)."""
    tie = registry.tied_weight(cfg)
    with torch.device("meta"):
        return [[p.numel() for name, p in make().named_parameters()
                 if not (tie is not None and i == tie.copy_layer and name == tie.copy_param)]
                for i, make in enumerate(registry.layer_factories(cfg))]


def count_layer_params(cfg, tie_copied: bool = True) -> list[int]:
    """Parameters each layer holds. A tied head counts its copy of the embedding when it sits on
    another stage than layer 0 (tie_copied, PipelineSpec.tie_copied: that copy is real memory),
    not when one stage holds both (K = 1, the V placement: one Parameter): see
    minipipe/pipeline/tied.py."""
    with torch.device("meta"):
        counts = [sum(p.numel() for p in make().parameters()) for make in registry.layer_factories(cfg)]
    tie = registry.tied_weight(cfg)
    if not tie_copied and tie is not None:
        counts[tie.copy_layer] -= tied_numel(cfg)
    return counts


def tied_numel(cfg) -> int:
    """Elements of the model's tied weight (0 when it has none): what a second copy costs."""
    tie = registry.tied_weight(cfg)
    if tie is None:
        return 0
    with torch.device("meta"):
        return registry.layer_factories(cfg)[tie.source_layer]().get_parameter(tie.source_param).numel()


def chunk_inputs(cfg, chunks: list[list[int]], rows: int, dtype: torch.dtype, device,
                 autocast_dtype: torch.dtype | None = None) -> list:
    """A zero value shaped like each chunk's input for a micro-batch of `rows` samples, traced
    through the model's earlier layers without memory: on the meta device, or under autocast on
    fake CPU tensors (meta tensors ignore autocast), so each boundary has the run's dtype (under
    bf16 the Transformer's residual stream stays float32, AmoebaNet's cells hand over bf16).
    Floating inputs of the model are in `dtype` (the parameters')."""
    family = registry.family(cfg)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        value = torch.zeros(family.input_shape(cfg, rows), dtype=torch.long if family.reads_tokens else dtype)
    starts, found = {chunk[0]: None for chunk in chunks}, 0
    tracing = nullcontext() if autocast_dtype is None else torch.autocast("cpu", dtype=autocast_dtype)
    for i, make in enumerate(registry.layer_factories(cfg)[:max(starts) + 1]):
        if i in starts:
            starts[i], found = value, found + 1
        if found == len(starts):
            break
        with torch.device("meta"):
            layer = make().to(dtype).eval()  # eval: the Head's logits are not needed
        with fake:
            layer.to_empty(device="cpu")
        with fake, torch.no_grad(), tracing:
            value = layer(value)
    return [map_tensors(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device), starts[chunk[0]])
            for chunk in chunks]
