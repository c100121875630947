"""I (input gradient) then W (weight gradients) add bitwise what the fused backward adds, for
every chunk position of every family and both kernel backends; I leaves the weights to W, and W
re-enters together only cut nodes that cannot reach each other."""
import pytest
import torch
from torch.autograd.graph import get_gradient_edge

from minipipe.config import make_config
from minipipe.layers import build_layers
from minipipe.models import registry
from minipipe.pipeline import values
from minipipe.pipeline.recompute import grad_leaf, recompute_forward
from minipipe.pipeline.split_backward import _split_graph, backward_input, backward_weight
from minipipe.pipeline.stage import Stage

FAMILIES = {
    "transformer": {"model": "transformer", "layers": 3, "d_model": 32, "heads": 2, "max_seq_len": 8,
                    "vocab": 64, "dropout": 0.1},
    "amoebanet": {"model": "amoebanet", "cells": 1, "filters": 4, "image_size": 8, "channels": 3,
                  "classes": 10},
    # q/k/v and gate/up projections read one input: W re-enters them in one call
    "llama": {"model": "llama", "layers": 3, "d_model": 32, "heads": 2, "kv_heads": 1, "ffn_dim": 48,
              "max_seq_len": 8, "vocab": 64, "dropout": 0.1},
}
# float64 on torch; the Triton kernels (the interpreter on CPU) run float32
BACKENDS = {"torch": torch.float64, "triton": torch.float32}


def _inputs(cfg, dtype):
    g = torch.Generator().manual_seed(0)
    if cfg.model in ("transformer", "llama"):
        return (torch.randint(0, cfg.vocab, (3, cfg.max_seq_len), generator=g),
                torch.randint(0, cfg.vocab, (3, cfg.max_seq_len), generator=g))
    return (torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size, generator=g, dtype=dtype),
            torch.randint(0, cfg.classes, (3,), generator=g))


def _chunk_grads(stage, chunk, value, grad_or_loss, split, recompute):
    """(input gradients, {parameter name: gradient}) of one chunk's backward, fused or split;
    with `recompute` the graph comes from minipipe's re-materialising forward."""
    stage.zero_grad(set_to_none=True)
    if recompute:
        leaf, output = recompute_forward(stage, value, 0, 1, input_grad=True, chunk=chunk)
    else:
        leaf = grad_leaf(value)
        output = stage(leaf, 0, 1, chunk)
    if callable(grad_or_loss):  # the last chunk: its output is the loss
        outputs, grads = [grad_or_loss(output)], [torch.tensor(1.0, dtype=torch.float64)]
        grads[0] = grads[0].to(outputs[0].dtype)
    else:
        outputs = [o for o in values.as_tuple(output) if o.requires_grad]
        grads = list(values.as_tuple(grad_or_loss))
    if split:
        pending = backward_input(outputs, grads, [t for t in values.as_tuple(leaf) if t.requires_grad])
        made_by_b = {n for n, p in stage.named_parameters() if p.grad is not None}
        backward_weight(pending)
        assert not made_by_b, f"I computed weight gradients: {sorted(made_by_b)[:3]}"
        assert pending.empty()
    else:
        torch.autograd.backward(outputs, grads)
    inputs = [t.grad for t in values.as_tuple(leaf) if t.is_floating_point()]
    return inputs, {n: p.grad for n, p in stage.named_parameters() if p.grad is not None}, output


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend, recompute", [("torch", False), ("torch", True), ("triton", False)])
def test_input_then_weight_halves_equal_the_fused_backward_bitwise(family, backend, recompute):
    cfg = make_config(**FAMILIES[family], data="synthetic", kernels=backend)
    dtype = BACKENDS[backend]
    n = len(registry.layer_factories(cfg))
    layers = {i: layer.to(dtype) for i, layer in build_layers(cfg, range(n), backend).items()}
    third = n // 3
    chunks = [list(range(third)), list(range(third, 2 * third)), list(range(2 * third, n))]
    stage = Stage(layers, seed=1, chunks=chunks).train()
    loss_sum = registry.loss_fn(cfg, backend)
    batch, targets = _inputs(cfg, dtype)
    value, checked = batch, 0
    for chunk in range(3):
        last = chunk == 2
        with torch.no_grad():
            output = stage(value, 0, 1, chunk)
        grad = (lambda out: loss_sum(out, targets) / 7) if last else values.map_tensors(
            lambda t, seed=chunk: torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(seed)),
            output, floating_only=True)
        fused = _chunk_grads(stage, chunk, value, grad, split=False, recompute=recompute and chunk > 0)
        halves = _chunk_grads(stage, chunk, value, grad, split=True, recompute=recompute and chunk > 0)
        assert len(fused[1]) > 0 and fused[1].keys() == halves[1].keys()
        for name in fused[1]:
            assert torch.equal(fused[1][name], halves[1][name]), f"chunk {chunk}: {name}"
        for a, b in zip(fused[0], halves[0], strict=True):
            assert torch.equal(a, b), f"chunk {chunk}: input gradient"
        checked += len(fused[1])
        value = values.detached(output)
    assert checked == len(list(stage.parameters()))


def test_a_weight_used_twice_by_input_side_ops_runs_whole_in_i():
    """Re-entering one user of a shared weight alone would count the other's share twice, so
    such a chunk is not split: I adds everything, W nothing, and the sums are still the fused ones."""
    weight = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    x = torch.randn(2, 4, dtype=torch.float64)
    grads = []
    for split in (False, True):
        weight.grad = None
        leaf = grad_leaf(x)
        out = (leaf @ weight).tanh() @ weight
        if split:
            pending = backward_input([out], [torch.ones_like(out)], [leaf])
            assert pending.empty() and weight.grad is not None
            backward_weight(pending)
        else:
            out.backward(torch.ones_like(out))
        grads.append((leaf.grad, weight.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_an_input_handed_on_unchanged_gets_its_whole_gradient_in_i():
    """AmoebaNet's cells return their input as the next cell's 'previous' state: that output's
    gradient belongs to the input's gradient, which I sends upstream."""
    linear = torch.nn.Linear(4, 4, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    grads = [torch.randn(2, 4, dtype=torch.float64) for _ in range(2)]
    results = []
    for split in (False, True):
        linear.zero_grad(set_to_none=True)
        leaf = grad_leaf(x)
        outputs = [leaf, linear(leaf).tanh()]
        if split:
            pending = backward_input(outputs, grads, [leaf])
            sent = leaf.grad.clone()
            backward_weight(pending)
            assert torch.equal(leaf.grad, sent)  # W added nothing to what was sent
        else:
            torch.autograd.backward(outputs, grads)
        results.append((leaf.grad, linear.weight.grad, linear.bias.grad))
    for fused, halves in zip(*results, strict=True):
        assert torch.equal(fused, halves)


def test_a_weight_read_twice_by_one_op_is_counted_once():
    """addcmul(x, w, w) has two edges into w's AccumulateGrad: W asks for that edge once (asking
    twice returned the summed gradient twice, and the weight got it twice)."""
    weight = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    x = torch.randn(2, 4, dtype=torch.float64)
    results = []
    for split in (False, True):
        weight.grad = None
        leaf = grad_leaf(x)
        out = torch.addcmul(leaf, weight, weight).sin()
        if split:
            backward_weight(backward_input([out], [torch.ones_like(out)], [leaf]))
        else:
            out.backward(torch.ones_like(out))
        results.append((leaf.grad, weight.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _reaches(node, target) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for child, _ in n.next_functions:
            if child is target:
                return True
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


@pytest.mark.parametrize("family", FAMILIES)
def test_w_groups_are_the_fewest_calls_whose_nodes_cannot_reach_each_other(family):
    """Re-entering two cut nodes in one call is exact only if neither reaches the other (else the
    upper one's gradient would flow on into the lower one, added to what I captured there). The
    levels are such groups, and as few as the longest chain of cut nodes: no grouping has fewer."""
    cfg = make_config(**FAMILIES[family], data="synthetic")
    n = len(registry.layer_factories(cfg))
    layers = build_layers(cfg, range(n))
    with torch.no_grad():
        value = layers[0](_inputs(cfg, torch.float32)[0])
    leaf = grad_leaf(value)
    outputs = [o for o in values.as_tuple(torch.nn.Sequential(*[layers[i] for i in range(1, n - 1)])(leaf))
               if o.requires_grad]
    inputs = [t for t in values.as_tuple(leaf) if t.requires_grad]
    pending = backward_input(outputs, [torch.ones_like(o) for o in outputs], inputs)
    groups = {}
    for level, (node, _, _) in zip(pending.levels, pending.reentries):
        groups.setdefault(level, []).append(node)
    groups = list(groups.values())
    assert max(len(g) for g in groups) > 1 or family == "transformer"  # the Transformer's cut nodes form one chain
    for group in groups:
        for a in group:
            assert not any(_reaches(a, b) for b in group if b is not a)
    _, cuts, level, _ = _split_graph([o.grad_fn for o in outputs], {get_gradient_edge(t).node for t in inputs})
    assert sorted(node.name() for g in groups for node in g) == sorted(node.name() for node in cuts)
    longest = {}  # cut nodes on the longest chain of cut nodes from each node down
    for node in sorted((node for g in groups for node in g), key=level.get):  # a node's level is above those it reaches
        longest[node] = 1 + max((longest[b] for b in longest if _reaches(node, b)), default=0)
    assert len(groups) == max(longest.values())
    backward_weight(pending)
