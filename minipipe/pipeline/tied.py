"""The tied weight: a model family may declare that two of its layers use one weight (its
FAMILY's `tied_weight`, a models.family.TiedWeight: GPT-2's token embedding of layer 0 is also
the output head's weight of the last layer, --tie-embeddings). Nothing here names a layer or a
parameter of any model: the declaration does.

Where the two layers live decides what "one weight" means:
- one stage holds both (K=1, or the V placement, whose first and last chunks are on stage 0): one
  Parameter, shared by the two modules (plain sharing; autograd sums both uses into its gradient);
- the stages of the first and the last chunk differ: each holds a copy, initialised equal
  (minipipe.layers.build_layers). After the drain (and the dp all-reduce) the two copies'
  gradients are summed in one all-reduce on a two-rank group {first chunk's stage, last chunk's
  stage} of each pipeline replica, as Megatron-LM does for
  its embedding group; both copies then take the same clipped AdamW step and stay bitwise equal
  (a + b == b + a in floating point, and every later op is the same on the same numbers).

Names: the weight's one global name is the source's, `tie.source_name`. The copy
(`tie.copy_name`) has no slot in the global gradient norm (so the norm counts the weight once, as
clip_grad_norm_ does over a model with a shared parameter) and is never written to a checkpoint
or an export: a stage holding it reads it back under the source's name.
"""
from datetime import timedelta

import torch
import torch.distributed as dist


# ---- checkpoints and exports: the weight is stored once, under the source's name ---------------
# `tie`: the family's TiedWeight for this config, or None when the model shares no weight.
def drop_copy(tie, tensors: dict) -> dict:
    """`tensors` (model or `{param}.{state}` optimizer names) without the copy."""
    if tie is None:
        return tensors
    name = tie.copy_name
    return {n: t for n, t in tensors.items() if n != name and not n.startswith(name + ".")}


def stored_name(tie, name: str) -> str:
    """The name under which a stage's tensor `name` (or `{name}.{state}`) is stored."""
    if tie is not None and (name == tie.copy_name or name.startswith(tie.copy_name + ".")):
        return tie.source_name + name[len(tie.copy_name):]
    return name


def with_copy(tie, tensors: dict) -> dict:
    """Stored model tensors with the copy added back (an alias, not a new tensor)."""
    if tie is None or tie.source_name not in tensors:
        return tensors
    return {**tensors, tie.copy_name: tensors[tie.source_name]}


# ---- training: one group, one sum, one norm slot -----------------------------------------------
class TiedEmbedding:
    """What one rank does for the tied weight after the drain. The source layer is the model's
    first and the copy its last, so the copies live on the stages of the first and the last chunk
    (spec.placement); only those two ranks of a replica build their group (a group-local
    rendezvous): the other stages need not know."""

    def __init__(self, stage, layout, tie, spec):
        layers = dict(zip(stage.indices, stage.layers.values()))
        self.tie = tie
        self.head = tie.copy_layer if tie is not None and tie.copy_layer in layers else None
        self.copy = None  # this rank's copy when the copies live on two stages
        self.group = None
        holds = tie is not None and (tie.source_layer in layers or tie.copy_layer in layers)
        if holds and spec.tie_copied:
            base = layout.rank - layout.stage
            self.group = dist.new_group(sorted([base + spec.placement[0], base + spec.placement[-1]]),
                                        use_local_synchronization=True, timeout=timedelta(seconds=spec.timeout_s))
            self.copy = (layers[tie.source_layer].get_parameter(tie.source_param) if tie.source_layer in layers
                         else layers[tie.copy_layer].get_parameter(tie.copy_param))

    def counted(self, index: int, layer) -> list:
        """Layer `index`'s parameters that have a slot in the global gradient norm: all but the
        copy of the tied weight."""
        if index != self.head:
            return list(layer.parameters())
        return [p for name, p in layer.named_parameters() if name != self.tie.copy_param]

    def sum_copies(self, all_reduce) -> None:
        """Both copies' gradients become their sum (after the dp all-reduce, before the norm).
        all_reduce: dist.all_reduce wrapped as a collective that names what failed."""
        if self.copy is None:
            return
        if self.copy.grad is None:
            self.copy.grad = torch.zeros_like(self.copy)
        all_reduce(self.copy.grad, group=self.group)
