"""One pipeline stage: the model's layers this rank holds, keyed by global layer index, in chunks.

A chunk is a contiguous run of layers; a stage holds one chunk, or V of them (interleaved, the V
schedules): its chunk v is the v-th of the model chunks the placement gives it
(PipelineSpec.chunks_on), in ascending order. `stage(value, step, m, chunk=v)` runs chunk v; the optimizer and the checkpoint see one module holding all of the rank's layers.

Parameter names stay global (`layers.7.weight`) whatever the cut, because the ModuleDict key is
the layer's index in the whole model. Before each layer that draws random numbers (dropout), the
RNG is seeded from (seed, step, layer, micro-batch): masks never depend on which process runs
the layer, and a re-materialising recompute replays them exactly with no RNG state to save.
"""
import torch
from torch import nn

from minipipe.pipeline.values import as_tuple
from minipipe.seeding import derive_seed


def _seed_generators(seed: int, device: torch.device) -> None:
    """The CPU generator and, for a value on a GPU, that GPU's generator: dropout draws from the
    generator of the device its tensor lives on, which need not be the current device that
    torch.cuda.manual_seed would seed (nor every GPU, as torch.manual_seed would)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index].manual_seed(seed)


def _is_stochastic(layer: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in layer.modules())


class Stage(nn.Module):
    def __init__(self, layers: dict[int, nn.Module], seed: int, chunks: list[list[int]] | None = None):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): layers[i] for i in sorted(layers)})
        self.indices = sorted(layers)
        self.chunks = chunks or [self.indices]  # global layer indices of each chunk, in order
        self.seed = seed
        self._stochastic = {i for i in self.indices if _is_stochastic(layers[i])}

    def forward(self, value, step: int = 0, microbatch: int = 0, chunk: int = 0):
        for i in self.chunks[chunk]:
            if self.training and i in self._stochastic:
                _seed_generators(derive_seed(self.seed, "dropout", step, i, microbatch),
                                 as_tuple(value)[0].device)
            value = self.layers[str(i)](value)
        return value
