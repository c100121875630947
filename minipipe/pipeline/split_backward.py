"""A chunk's backward in two halves (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"):
I, the input gradient (the paper's B), and W, the weight gradients:

    pending = backward_input(outputs, grads, inputs)   # I: input gradients only, into inputs' .grad
    ...                                                # (send them upstream, run other work)
    backward_weight(pending)                           # W: weight gradients, into the parameters' .grad

Together they add exactly what `torch.autograd.backward(outputs, grads)` adds, bitwise, and no
gradient op runs twice. It works on the autograd graph, so every layer of every family and
every kernel backend is split the same way, with no change to the models:

- The graph's nodes that lead to a chunk input are the *input side*: I runs only those
  (`torch.autograd.grad` with the inputs as targets). Autograd's own pruning then skips, inside
  each node, the outputs that lead only to weights: a linear's backward node computes
  grad_output @ W for the input and leaves grad_output^T @ x (the weight GEMM) undone.
- Every edge from an input-side node into the weight side is a *cut edge*. A prehook on the
  node captures the gradient that reached it during I; W re-enters the node with it and asks
  for its cut edges only (the weight GEMM), then runs the weight side from all cut edges at once.
- W re-enters the cut nodes level by level, one `autograd.grad` call per level, a node's level
  being the number of re-entered cut nodes on the longest path below it. Exact because a call
  runs only the nodes on a path from its roots to the edges it asks for: a cut edge's weight-side
  node has its cut node as only parent (last paragraph), so a path from root A to B's cut edge passes
  through B, and B would be below A, on a lower level. Each root therefore runs alone, on its
  captured gradient, and nothing flows from one root into another (which would add to B's
  captured gradient what I already sent through B). The number of calls is the longest chain
  of cut nodes, the fewest such groups can have: a Transformer block's cut nodes form one chain
  (7 calls per block), Llama's q/k/v and gate/up projections share a level, a 1-cell AmoebaNet
  chunk's 119 cut nodes take 45 calls. Each call costs the engine a walk of the graph below its
  roots, which is what makes W dearer than the weight half of the fused backward on small chunks.
- A custom autograd Function (the Triton kernels) computes all its outputs in one call whatever
  is asked, and some update saved tensors in place, so it is never re-entered: I collects the
  gradients it already produced on its cut edges and W starts from them.
- A chunk whose inputs carry no gradient (the first chunk: token ids) has no input side: I does
  nothing and W is the whole backward. An input handed on unchanged as an output (AmoebaNet's
  cells) gets that output's gradient in I.

What W keeps alive between I and W (the planner counts it, minipipe/plan.py): the chunk's
autograd graph with every saved tensor (the activations, as without recompute: with recompute
the graph rebuilt at I lives until W) and one captured output gradient per cut node (a linear's
output size, per linear of the chunk), except the nodes above every cut (the loss's, on the last
chunk): only the outputs reference them, so they and their saved tensors go when the engine drops
the outputs after I. W is the graph's last use: each call frees the saved
tensors of the nodes it ran, so the activations go level by level during W. The captured
gradients also keep the engine from summing into them in place during I (a residual stream's
gradient is both a linear's captured grad_output and a term of the next sum), so a few sums
that the fused backward does in place allocate.

Re-entering a node on its own is exact only if each weight-side node reached from a cut has that
cut node as its only parent; otherwise (a weight used by two input-side ops in one chunk) the
chunk is not split: I runs the whole backward and W has nothing to do.
"""
import itertools
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

try:  # the engine call behind torch.autograd.grad / backward, past their argument checks
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # a torch without it (private): the public calls, the same gradients
    _engine_run_backward = None


@dataclass
class PendingWeightGrad:
    """What W needs from I: the cut nodes to re-enter with the gradient captured at each, and
    the weight-side edges whose gradients I already has (custom Functions, outputs)."""
    reentries: list = field(default_factory=list)  # (node, captured grad_outputs, its cut edges)
    levels: list = field(default_factory=list)  # each re-entry's level: one call re-enters a level
    ready: list = field(default_factory=list)  # (GradientEdge into the weight side, its gradient)

    def empty(self) -> bool:
        return not self.reentries and not self.ready

    def held_bytes(self) -> int:
        """The captured gradients W needs beyond the graph (each storage once)."""
        grads = [g for _, grad_outputs, _ in self.reentries for g in grad_outputs if g is not None]
        grads += [g for _, g in self.ready]
        return sum({id(g.untyped_storage()): g.untyped_storage().nbytes() for g in grads}.values())


def _is_custom_function(node) -> bool:
    return isinstance(node, torch.autograd.function.BackwardCFunction)


def _split_graph(roots, input_nodes):
    """One walk of the graph below `roots`: the input side (the nodes that lead to an input),
    each cut node's cut edges (its edges into the weight side, each once), the parents of each
    weight-side node, and each input-side node's level: how many re-entered cut nodes lie on the
    longest path below it, itself excluded. A node reaching a re-entered cut node has a higher
    level than it, so the cut nodes of one level never reach each other."""
    input_side, cuts, level, weight_parents, reentered = set(), {}, {}, {}, set()
    seen, stack = set(), [(node, None) for node in roots]
    while stack:
        node, children = stack.pop()
        if children is None:  # first visit: come back to it after its children
            if node not in seen:
                seen.add(node)
                children = [(c, nr) for c, nr in node.next_functions if c is not None]
                stack.append((node, children))
                stack += [(c, None) for c, _ in children]
            continue
        below = [c for c, _ in children if c in input_side]
        if node in input_nodes:
            input_side.add(node)
            level[node] = 0
        elif below:
            input_side.add(node)
            level[node] = max([level[c] + (c in reentered) for c in below])
            if len(below) < len(children):
                edges = list(dict.fromkeys(GradientEdge(c, nr) for c, nr in children if c not in input_side))
                cuts[node] = edges
                if not _is_custom_function(node):
                    reentered.add(node)
                for edge in edges:
                    weight_parents.setdefault(edge.node, set()).add(node)
        else:
            for c, _ in children:
                weight_parents.setdefault(c, set()).add(node)
    return input_side, cuts, level, weight_parents


def backward_input(outputs, grads, inputs) -> PendingWeightGrad:
    """I: d(outputs)/d(inputs) into each input's .grad; returns what backward_weight needs.
    `outputs` (tensors that require grad) and `grads` (a tensor each, even for a scalar output)
    pair up; `inputs` are leaf tensors."""
    inputs = [t for t in inputs if t.requires_grad]
    input_side, cuts, level, weight_parents = _split_graph([o.grad_fn for o in outputs if o.grad_fn is not None],
                                                           {get_gradient_edge(t).node for t in inputs})
    pending = PendingWeightGrad()
    # an input handed on unchanged (AmoebaNet's cells pass their input on) is its own gradient's
    # path: I adds it; an output made without the inputs (the first chunk) starts the weight side
    passed_on = [(o, g) for o, g in zip(outputs, grads) if any(o is t for t in inputs)]
    made = [(o, g) for o, g in zip(outputs, grads) if not any(o is t for t in inputs)]
    pending.ready = [(o, g) for o, g in made if o.grad_fn not in input_side]
    if any(weight_parents[e.node] != {node} for node, edges in cuts.items() for e in edges):
        torch.autograd.backward(outputs, grads)  # see the module docstring: not split
        return PendingWeightGrad()
    if not inputs:
        return pending
    collected = [e for node, edges in cuts.items() if _is_custom_function(node) for e in edges]
    captured, hooks = {}, []
    for node in cuts:
        if not _is_custom_function(node):
            hooks.append(node.register_prehook(lambda grad_outputs, node=node: captured.__setitem__(node, grad_outputs)))
    split = [(o, g) for o, g in made if o.grad_fn in input_side]
    try:
        got = torch.autograd.grad([o for o, _ in split], inputs + collected, [g for _, g in split],
                                  retain_graph=True, allow_unused=True) if split else [None] * (len(inputs) + len(collected))
    finally:
        for hook in hooks:
            hook.remove()
    for t, g in [*zip(inputs, got), *passed_on]:
        t.grad = g if t.grad is None or g is None else t.grad + g
    pending.ready += [(e, g) for e, g in zip(collected, got[len(inputs):]) if g is not None]
    by_level = sorted(captured, key=level.get)
    pending.reentries = [(node, captured[node], cuts[node]) for node in by_level]
    pending.levels = [level[node] for node in by_level]
    return pending


def backward_weight(pending: PendingWeightGrad) -> None:
    """W: the weight gradients I left, accumulated into each parameter's .grad.
    It calls the autograd engine as torch.autograd.grad / backward do after checking their
    arguments: every gradient here came from the engine with its edge's shape, and the check
    (torch.autograd._make_grads, per root) took a quarter of W on a 1-cell AmoebaNet chunk."""
    edges, grads = [e for e, _ in pending.ready], [g for _, g in pending.ready]
    for _, group in itertools.groupby(zip(pending.levels, pending.reentries), key=lambda pair: pair[0]):
        roots, root_grads, cut_edges = [], [], []
        for _, (node, grad_outputs, node_cut_edges) in group:
            for nr, g in enumerate(grad_outputs):
                if g is not None:
                    roots.append(GradientEdge(node, nr))
                    root_grads.append(g)
            cut_edges += node_cut_edges
        # = torch.autograd.grad(roots, cut_edges, root_grads, allow_unused=True); without
        # retain_graph, as W is the graph's last use: a node's saved tensors go once it has run
        got = _grads_at(roots, root_grads, cut_edges)
        for edge, grad in zip(cut_edges, got):
            if grad is not None:
                edges.append(edge)
                grads.append(grad)
    if edges:
        _accumulate(edges, grads)
    pending.reentries.clear()
    pending.levels.clear()
    pending.ready.clear()


def _grads_at(roots, root_grads, edges):
    if _engine_run_backward is None:
        return torch.autograd.grad(roots, edges, root_grads, allow_unused=True)
    return _engine_run_backward(tuple(roots), tuple(root_grads), False, False, tuple(edges), True,
                                accumulate_grad=False)


def _accumulate(edges, grads) -> None:
    if _engine_run_backward is None:
        torch.autograd.backward(edges, grads)
    else:
        _engine_run_backward(tuple(edges), tuple(grads), False, False, (), True, accumulate_grad=True)
