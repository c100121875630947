"""What one micro-batch of each layer saves for backward, keeps from I to W and costs in FLOPs,
for the planner (minipipe/plan.py): the layers are built on the 'meta' device and traced as fake
CPU tensors (no memory, no data, no processes). Saved bytes come from saved_tensors_hooks, each
storage counted once; a split backward's are measured by running it (split_backward.backward_input,
as the engine does); FLOPs come from torch's FlopCounterMode over a forward and backward.

The ops are the plain-torch ones as the CPU runs them (SDPA's flash kernel, like a GPU's and
Triton's, saves no T x T scores and reads grouped-query K and V once); under bf16/fp16 the layers
hold float32 weights and are traced under autocast, as the run is (the activations have the run's
dtypes, a float32 Transformer boundary included). Identical layers are traced once.
"""
import dataclasses
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minipipe.config import Config
from minipipe.models import registry
from minipipe.pipeline.spec import PipelineSpec
from minipipe.pipeline.split_backward import backward_input
from minipipe.pipeline.values import as_tuple

_TRACES: dict = {}  # (previous layer, layer, input) signature -> traced numbers; layers repeat


@dataclass
class LayerProfile:
    params: int
    input_bytes: int  # the value the layer receives, one micro-batch
    alone_bytes: int  # saved for backward when the layer starts a stage (its input excluded)
    chained_bytes: int  # saved for backward and not already saved by the previous layer
    flops: float  # forward + backward, one micro-batch
    weight_grad_bytes: int  # split backward: gradients kept from I to W (the last layer's with the loss)
    # split backward, the layer topping a chunk: saved bytes gone when I returns, its input excluded
    # when it also starts the chunk (alone), its input included when it follows a layer (chained)
    freed_alone_bytes: int
    freed_chained_bytes: int


def _spec(value) -> tuple:
    return isinstance(value, tuple), tuple((tuple(t.shape), t.dtype) for t in as_tuple(value))


def _fresh(spec, requires_grad: bool):
    is_tuple, entries = spec
    tensors = tuple(torch.empty(shape, dtype=dtype).requires_grad_(  # on the tracing device
        requires_grad and dtype.is_floating_point) for shape, dtype in entries)
    return tensors if is_tuple else tensors[0]


def _storage(t: torch.Tensor):
    return t.untyped_storage()._cdata  # the storage's identity: views of one tensor share it


def _signature(layer: nn.Module) -> tuple:
    """What decides a layer's saved bytes and FLOPs: its structure, shapes, dtypes and settings."""
    settings = tuple((name, str(value)) for module in layer.modules() for name, value in
                     sorted(vars(module).items()) if isinstance(value, (int, float, str, list, tuple)))
    dtypes = tuple(p.dtype for p in layer.parameters())
    return repr(layer), settings, dtypes


def _trace(previous: nn.Module | None, layer: nn.Module, spec, model_input: bool) -> tuple:
    """(alone bytes, chained bytes, output spec) of `layer` fed from `previous` (if any)."""
    saved = {"previous": {}, "layer": {}}
    params = {_storage(p) for m in (previous, layer) if m is not None for p in m.parameters()}
    phase = "previous"

    def pack(tensor):
        if _storage(tensor) not in params:
            saved[phase][_storage(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = _fresh(spec, requires_grad=not model_input)
        kept = [value]  # storages stay alive (and their identities unique) until counted
        if previous is not None:
            value = previous(value)
            kept.append(value)
        phase = "layer"
        inputs = {_storage(t) for t in as_tuple(value)}
        output = layer(value)
    layer_saved = saved["layer"]
    alone = sum(b for s, b in layer_saved.items() if s not in inputs)
    chained = sum(b for s, b in layer_saved.items() if s not in saved["previous"])
    return alone, chained, _spec(output)


class _Saved:
    """A saved tensor's stand-in: it dies with the autograd node that saved it. Detached: a saved
    output held with its grad_fn would keep its own node alive (autograd's own saving avoids it)."""

    def __init__(self, tensor):
        self.tensor = tensor.detach()


def _split_backward_bytes(layers: list[nn.Module], spec, input_is_the_boundary: bool) -> tuple[int, int]:
    """The split backward of `layers` on one micro-batch, run as the engine runs it: (the
    gradients I captures for W, the saved bytes freed when I returns). The engine drops the
    outputs after I; W keeps only the cut nodes and the graph below them, so what the nodes above
    every cut saved (on the last chunk the loss's log-probabilities) goes then. Measured, not
    assumed: each saved tensor's stand-in dies with its node. The input counts when it is the
    chunk's boundary and its leaf dies too (the engine has let go of it: an AmoebaNet classifier
    alone in its chunk, whose pooling saves it above the cut); otherwise the layers below hold it."""
    saved = []  # (weak stand-in, storage, bytes) per saved tensor
    params = {_storage(p) for layer in layers for p in layer.parameters()}

    def pack(tensor):
        stand_in = _Saved(tensor)
        if _storage(tensor) not in params:
            saved.append((weakref.ref(stand_in), _storage(tensor), tensor.untyped_storage().nbytes()))
        return stand_in

    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.tensor):
        value = _fresh(spec, requires_grad=True)
        outputs = [t for t in as_tuple(nn.Sequential(*layers)(value)) if t.requires_grad]
        pending = backward_input(outputs, [torch.empty_like(t) for t in outputs],
                                 [t for t in as_tuple(value) if t.requires_grad])
    inputs, leaves = {_storage(t) for t in as_tuple(value)}, [weakref.ref(t) for t in as_tuple(value)]
    boundary = [t.untyped_storage().nbytes() for t in as_tuple(value)]
    del outputs, value
    alive, size = set(), {}
    for ref, storage, nbytes in saved:
        size[storage] = nbytes
        if ref() is not None:
            alive.add(storage)
    freed = sum(b for storage, b in size.items() if storage not in alive and storage not in inputs)
    if input_is_the_boundary:
        freed += sum(b for leaf, b in zip(leaves, boundary) if leaf() is None)
    return pending.held_bytes(), freed


def _flops(layer: nn.Module, spec, model_input: bool) -> float:
    # The model's FLOPs whichever attention kernel runs: SDPA's math path counts its two matmuls.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        output = layer(_fresh(spec, requires_grad=not model_input))
        outputs = [t for t in as_tuple(output) if t.requires_grad]
        if outputs:
            torch.autograd.backward([t.sum() for t in outputs])
    return float(counter.get_total_flops())


class _Loss(nn.Module):
    """The loss as the last 'layer' of the last stage: what it saves counts there too."""

    def __init__(self, cfg, targets_shape):
        super().__init__()
        self.loss_sum, self.targets_shape = registry.loss_fn(cfg), targets_shape

    def forward(self, output):
        return self.loss_sum(output, torch.zeros(self.targets_shape, dtype=torch.long))


def _as_the_run_computes(spec: PipelineSpec):
    """The context to trace the meta-built layers in, with the activation dtypes and the saved
    tensors of the run: the layers move to fake CPU tensors (no memory; once, and only when a
    trace is not cached), under bf16/fp16 autocast when the run has it. Meta tensors would ignore
    autocast (the Transformer's residual stream, its stage boundary, stays float32 in the run;
    CPU autocast casts matmuls, convolutions and elementwise ops as CUDA's does), and SDPA on the
    meta device takes the math path, which saves the T x T scores and, for grouped-query
    attention, K and V repeated per query head. On fake CPU tensors SDPA saves what the CPU's
    flash kernel saves: no scores, the shared K and V once, as a GPU's flash kernel does."""
    autocast, moved = spec.autocast_dtype, set()
    fake = FakeTensorMode(allow_non_fake_inputs=True)

    @contextmanager
    def tracing(*layers):
        with fake:
            for layer in layers:
                if layer is not None and id(layer) not in moved:
                    layer.to_empty(device="cpu")
                    moved.add(id(layer))
        with fake, (torch.autocast("cpu", dtype=autocast) if autocast else nullcontext()):
            yield
    return tracing


def resolve_data_fields(cfg) -> Config:
    """A copy of cfg with the data-dependent fields filled as the default data would fill them
    (bytes: vocab 256; digits: 1 channel, 10 classes), so planning reads no data."""
    return dataclasses.replace(cfg, **registry.family(cfg).planning_defaults(cfg))


def profile_layers(cfg, *, spec: PipelineSpec) -> list[LayerProfile]:
    """One profile per global layer, plus the loss last, for one micro-batch of the run."""
    cfg = resolve_data_fields(cfg)
    family = registry.family(cfg)
    micro, dtype = spec.microbatch_rows, spec.param_dtype
    built = {}  # one module per distinct factory: the Transformer's blocks share one
    with torch.device("meta"):
        layers = []
        for factory in registry.layer_factories(cfg):
            if id(factory) not in built:
                built[id(factory)] = factory().to(dtype)
            layers.append(built[id(factory)])
        layers.append(_Loss(cfg, family.targets_shape(cfg, micro)))
    trace_as_the_run_computes = _as_the_run_computes(spec)
    spec = (False, ((family.input_shape(cfg, micro), torch.long if family.reads_tokens else dtype),))
    profiles, previous, previous_spec = [], None, None
    signatures = {id(layer): _signature(layer) for layer in layers}
    for i, layer in enumerate(layers):
        key = (cfg.dtype, signatures[id(previous)] if previous is not None else None, previous_spec,
               signatures[id(layer)], spec)
        if key not in _TRACES:
            first = previous is None
            with trace_as_the_run_computes(previous, layer):
                alone, chained, out_spec = _trace(previous, layer, previous_spec if not first else spec,
                                                  model_input=first)
                split = (0, 0, 0)
                if not first and i < len(layers) - 1:
                    above = [layer] + layers[i + 1:] if i == len(layers) - 2 else [layer]  # the loss too
                    weight_grads, freed_alone = _split_backward_bytes(above, spec, input_is_the_boundary=True)
                    # chained: the previous layer's nodes (and its output) that only this one's reach
                    freed_chained = _split_backward_bytes([previous] + above, previous_spec,
                                                          input_is_the_boundary=False)[1] if i > 1 else 0
                    split = weight_grads, freed_alone, freed_chained
                _TRACES[key] = alone, chained, out_spec, _flops(layer, spec, model_input=first), split
        alone, chained, out_spec, flops, split = _TRACES[key]
        input_bytes = sum(torch.Size(s).numel() * d.itemsize for s, d in spec[1])
        params = sum(p.numel() for p in layer.parameters())
        profiles.append(LayerProfile(params, input_bytes, alone, chained, flops, *split))
        previous, previous_spec, spec = layer, spec, out_spec
    return profiles
