"""Layer contract: shapes, parameter counts, init that is independent of the cut."""
import math

import pytest
import torch

from minipipe.config import make_config
from minipipe.data import load_settled
from minipipe.layers import build_layers, count_layer_params
from minipipe.models import registry


def transformer_cfg(**kw):
    cfg = make_config(model="transformer", vocab=256, **kw)
    return cfg


def closed_form_param_count(cfg) -> int:
    """Embeddings + L blocks (2 LayerNorms, qkv, proj, fc, proj) + final LayerNorm + head."""
    d, v = cfg.d_model, cfg.vocab
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return v * d + cfg.max_seq_len * d + cfg.layers * block + 2 * d + d * v


@pytest.mark.parametrize("preset", ["tiny", "small", "gpipe"])
def test_transformer_preset_param_count_matches_closed_form(preset):
    cfg = transformer_cfg(preset=preset)
    counted = sum(count_layer_params(cfg))
    assert counted == closed_form_param_count(cfg)
    assert len(registry.layer_factories(cfg)) == cfg.layers + 2


def test_gpipe_transformer_preset_has_paper_shape():
    cfg = make_config(model="transformer", preset="gpipe")
    assert (cfg.d_model, cfg.heads, cfg.vocab) == (2048, 32, 32000)
    block = count_layer_params(cfg)[1]
    assert block == 12 * 2048 ** 2 + 13 * 2048  # d_ff = 4 x 2048 = 8192


def test_transformer_shapes_through_every_layer():
    cfg = transformer_cfg(layers=2, d_model=32, heads=4, max_seq_len=16)
    layers = build_layers(cfg, range(4))
    value = torch.randint(0, 256, (3, 16))
    value = layers[0](value)
    assert value.shape == (3, 16, 32)
    value = layers[2](layers[1](value))
    hidden, weight = layers[3](value)  # training: what the fused loss multiplies, chunk by chunk
    assert hidden.shape == (3, 16, 32) and weight is layers[3].proj.weight
    logits = layers[3].eval()(value)
    assert logits.shape == (3, 16, 256)
    torch.testing.assert_close(logits, torch.nn.functional.linear(hidden, weight), rtol=0, atol=0)


@pytest.mark.parametrize("preset,cells,filters", [("tiny", 1, 8), ("small", 2, 32)])
def test_amoebanet_layers_and_shapes(preset, cells, filters):
    cfg = make_config(model="amoebanet", preset=preset, classes=10, channels=3)
    factories = registry.layer_factories(cfg)
    assert len(factories) == 3 * cells + 4
    layers = build_layers(cfg, range(len(factories)))
    value = torch.randn(2, 3, 32, 32)
    sizes = []
    for i in range(len(factories)):
        value = layers[i](value)
        if isinstance(value, tuple):
            assert len(value) == 2
            sizes.append(value[1].shape[-1])
    assert value.shape == (2, 10)
    assert sizes[0] == 32 and sizes[-1] == 8  # two reduction cells: 32 -> 16 -> 8
    real = sum(p.numel() for l in layers.values() for p in l.parameters())
    assert real == sum(count_layer_params(cfg))


@pytest.mark.parametrize("family", ["transformer", "amoebanet"])
def test_init_is_independent_of_the_cut(family):
    if family == "transformer":
        cfg = transformer_cfg(layers=6, d_model=32, heads=2, max_seq_len=16, dropout=0.1)
    else:
        cfg = make_config(model="amoebanet", classes=10, channels=3)
    n = len(registry.layer_factories(cfg))
    whole = build_layers(cfg, range(n))
    part = build_layers(cfg, range(2, n - 1))
    for i, layer in part.items():
        for (name, a), (_, b) in zip(whole[i].state_dict().items(), layer.state_dict().items()):
            assert torch.equal(a, b), f"layer {i} {name} differs when built alone"
    other_seed = build_layers(make_config(**{**cfg.to_dict(), "seed": cfg.seed + 1}), [2])
    flat = lambda layer: torch.cat([p.flatten() for p in layer.parameters()])
    assert not torch.equal(flat(other_seed[2]), flat(whole[2])), "the seed must change the weights"


def test_no_parameter_is_shared_between_layers():
    cfg = transformer_cfg(layers=3, d_model=32, heads=2, max_seq_len=16)
    layers = build_layers(cfg, range(5))
    seen = {}
    for i, layer in layers.items():
        for p in layer.parameters():
            assert id(p) not in seen, f"layer {i} shares a parameter with layer {seen[id(p)]}"
            seen[id(p)] = i


def test_lm_loss_at_init_is_ln_vocab():
    cfg, data = load_settled(make_config(model="transformer", layers=2, d_model=64, heads=4, seq_len=64))
    layers = build_layers(cfg, range(4))
    inputs, targets = data.batch(0, 8)
    value = inputs
    with torch.no_grad():
        for i in range(4):
            value = layers[i](value)
    loss = registry.loss_fn(cfg)(value, targets) / registry.count_loss_units(cfg, targets)
    assert abs(loss.item() - math.log(256)) < 0.1


def test_the_transformer_training_loss_runs_the_fused_linear_cross_entropy(monkeypatch):
    """Training never asks the head for whole logits: the loss gets (hidden, weight) and calls
    ops.linear_cross_entropy (chunked on the Triton path), once per micro-batch forward."""
    from minipipe.kernels import ops
    from tests.harness import run_steps
    calls = []
    fused = ops.linear_cross_entropy

    def spy(hidden, weight, *args, **kwargs):
        calls.append((tuple(hidden.shape), tuple(weight.shape)))
        return fused(hidden, weight, *args, **kwargs)
    monkeypatch.setattr(ops, "linear_cross_entropy", spy)
    run_steps(1, model="transformer", layers=1, d_model=16, heads=2, max_seq_len=8, data="synthetic",
              batch_size=4, microbatches=2, recompute="never")
    assert calls == [((2 * 8, 16), (256, 16))] * 2
