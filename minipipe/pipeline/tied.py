"""The tied embedding (--tie-embeddings): the token embedding of layer 0 is also the output head's
weight of the last layer, GPT-2 style.

Where the two layers live decides what "one weight" means:
- one stage holds both (K=1): one Parameter, shared by the two modules (plain sharing; autograd
  sums both uses into its gradient);
- the first and the last stage (K>1): each holds a copy, initialised equal (minipipe.layers.build_layers).
  After the drain (and the dp all-reduce) the two copies' gradients are summed in one all-reduce
  on a two-rank group {first stage, last stage} of each pipeline replica, as Megatron-LM does for
  its embedding group; both copies then take the same clipped AdamW step and stay bitwise equal
  (a + b == b + a in floating point, and every later op is the same on the same numbers).

Names: the weight's one global name is the embedding's, SOURCE_NAME. The head's copy
(`layers.{L+1}.proj.weight`) has no slot in the global gradient norm (so the norm counts the
weight once, as clip_grad_norm_ does over a model with a shared parameter) and is never written
to a checkpoint or an export: a stage holding it reads it back under SOURCE_NAME.
"""
from datetime import timedelta

import torch
import torch.distributed as dist

SOURCE_NAME = "layers.0.tokens.weight"  # the tied weight's one global name
COPY_PARAM = "proj.weight"  # the head's parameter that is the tied weight


def head_index(cfg) -> int:
    return cfg.layers + 1  # [Embedding, Block x L, Head]


def copy_name(cfg) -> str | None:
    """Global name of the head's copy, or None when the model is not tied."""
    return f"layers.{head_index(cfg)}.{COPY_PARAM}" if is_tied(cfg) else None


def is_tied(cfg) -> bool:
    return bool(cfg.tie_embeddings)  # the config allows it for the Transformer only


def copy_numel(cfg) -> int:
    """Elements of the tied weight (0 when untied): what a second copy costs."""
    return cfg.vocab * cfg.d_model if is_tied(cfg) else 0


# ---- checkpoints and exports: the weight is stored once, under SOURCE_NAME ----------------------
def drop_copy(cfg, tensors: dict) -> dict:
    """`tensors` (model or `{param}.{state}` optimizer names) without the head's copy."""
    name = copy_name(cfg)
    if name is None:
        return tensors
    return {n: t for n, t in tensors.items() if n != name and not n.startswith(name + ".")}


def stored_name(cfg, name: str) -> str:
    """The name under which a stage's tensor `name` (or `{name}.{state}`) is stored."""
    copy = copy_name(cfg)
    if copy is not None and (name == copy or name.startswith(copy + ".")):
        return SOURCE_NAME + name[len(copy):]
    return name


def with_copy(cfg, tensors: dict) -> dict:
    """Stored model tensors with the head's copy added back (an alias, not a new tensor)."""
    name = copy_name(cfg)
    if name is None or SOURCE_NAME not in tensors:
        return tensors
    return {**tensors, name: tensors[SOURCE_NAME]}


# ---- training: one group, one sum, one norm slot -----------------------------------------------
class TiedEmbedding:
    """What one rank does for the tied weight after the drain. The model says it is tied: its
    Embedding and Head layers carry `tied = True`. Only the two ranks of a replica that hold a copy
    build their group (a group-local rendezvous), so middle stages need not know."""

    def __init__(self, stage, layout, timeout_s: float):
        layers = dict(zip(stage.indices, stage.layers.values()))
        tied = [i for i, layer in layers.items() if getattr(layer, "tied", False)]
        self.head = max(tied) if layout.is_last and tied else None
        self.copy = None  # this rank's copy when the copies live on two stages
        self.group = None
        if tied and layout.n_stages > 1:
            first = layout.rank - layout.stage
            self.group = dist.new_group([first, first + layout.n_stages - 1], use_local_synchronization=True,
                                        timeout=timedelta(seconds=timeout_s))
            self.copy = layers[0].tokens.weight if layout.is_first else layers[self.head].proj.weight

    def counted(self, index: int, layer) -> list:
        """Layer `index`'s parameters that have a slot in the global gradient norm: all but the
        head's copy of the tied weight."""
        if index != self.head:
            return list(layer.parameters())
        return [p for name, p in layer.named_parameters() if name != COPY_PARAM]

    def sum_copies(self, all_reduce) -> None:
        """Both copies' gradients become their sum (after the dp all-reduce, before the norm).
        all_reduce: dist.all_reduce wrapped as a collective that names what failed."""
        if self.copy is None:
            return
        if self.copy.grad is None:
            self.copy.grad = torch.zeros_like(self.copy)
        all_reduce(self.copy.grad, group=self.group)
