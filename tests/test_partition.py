import itertools
import random
import time
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from minipipe import build
from minipipe.config import make_config
from minipipe.data import load_settled
from minipipe.errors import ConfigError
from minipipe.layers import build_layers
from minipipe.models import registry
from minipipe.partition import balance_by_cost, check_balance, format_cut, profile_costs, stage_ranges
from minipipe.pipeline.spec import pipeline_spec
from minipipe.schedule.actions import chunk_placement


def max_stage_cost(costs, balance):
    return max(sum(costs[i] for i in r) for r in stage_ranges(balance))


def brute_force_min_max(costs, n_stages):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_balance_by_cost_matches_brute_force_min_max():
    rng = random.Random(0)
    for _ in range(300):
        n_layers = rng.randint(1, 9)
        n_stages = rng.randint(1, n_layers)
        costs = [rng.choice([0, 1, 2, 3, 5, 8, 13]) for _ in range(n_layers)]  # ints: exact sums, many ties
        balance = balance_by_cost(costs, n_stages)
        assert len(balance) == n_stages and all(b >= 1 for b in balance) and sum(balance) == n_layers
        assert max_stage_cost(costs, balance) == brute_force_min_max(costs, n_stages), (costs, n_stages)


def test_balance_by_cost_exact_on_float_costs():
    rng = random.Random(1)
    for _ in range(100):
        n_layers = rng.randint(2, 10)
        n_stages = rng.randint(1, n_layers)
        costs = [rng.random() for _ in range(n_layers)]
        got = max_stage_cost(costs, balance_by_cost(costs, n_stages))
        assert got == pytest.approx(brute_force_min_max(costs, n_stages), rel=1e-12)


def test_balance_ties_fill_earlier_stages_first():
    assert balance_by_cost([1.0] * 8, 3) == [3, 3, 2]
    assert balance_by_cost([1.0] * 4, 4) == [1, 1, 1, 1]
    assert balance_by_cost([0.0] * 5, 2) == [4, 1]
    assert balance_by_cost([10.0, 1, 1, 1, 1, 1], 2) == [1, 5]


def test_more_stages_than_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="more stages than layers: 3 layers cannot be cut into 4 stages"):
        balance_by_cost([1.0, 1.0, 1.0], 4)
    with pytest.raises(ConfigError, match="--stages must be >= 1"):
        balance_by_cost([1.0], 0)


@pytest.mark.parametrize("balance, message", [
    ([3, 3], "has 2 entries but --stages is 3"),
    ([4, 0, 4], "every stage needs at least 1 layer"),
    ([3, 3, 3], "sums to 9 but the model has 8 layers"),
])
def test_bad_explicit_balance_is_a_config_error(balance, message):
    with pytest.raises(ConfigError, match=message):
        check_balance(balance, n_layers=8, n_stages=3)
    assert check_balance((3, 3, 2), 8, 3) == [3, 3, 2]


def test_an_interleaved_balance_counts_model_chunks():
    with pytest.raises(ConfigError, match=r"--stages 2 x --virtual-stages 2 = 4 model chunks"):
        check_balance([4, 4], n_layers=8, n_stages=2, virtual_stages=2)
    assert check_balance([2, 2, 2, 2], 8, 2, virtual_stages=2) == [2, 2, 2, 2]


def test_stage_ranges_are_global_layer_indices():
    assert stage_ranges([3, 3, 2]) == [range(0, 3), range(3, 6), range(6, 8)]


def tiny_stack():
    torch.manual_seed(0)
    return [nn.Linear(8, 8), nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 8)]


def test_profile_time_is_positive_per_layer():
    stack = tiny_stack()
    costs = profile_costs(stack.__getitem__, len(stack), torch.randn(16, 8), by="time", device="cpu")
    assert len(costs) == 4 and all(0 < c < 1.0 for c in costs)


def test_profile_memory_grows_with_layer_width_and_leaves_no_trace():
    layers = tiny_stack() + [nn.BatchNorm1d(8)]
    before = [p.detach().clone() for layer in layers for p in layer.parameters()]
    sample = torch.randn(16, 8)
    rng_before = torch.get_rng_state()
    costs = profile_costs(layers.__getitem__, len(layers), sample, by="memory", device="cpu")
    assert all(c > 0 for c in costs)
    assert costs[1] > costs[0]  # 8 -> 256 saves the same input but holds 32x the weights
    assert costs[2] > 0  # tanh saves its 16x256 output: activation bytes, no parameters
    assert all(p.grad is None for layer in layers for p in layer.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, (p for layer in layers for p in layer.parameters())))
    assert layers[-1].num_batches_tracked.item() == 0 and torch.equal(torch.get_rng_state(), rng_before)


def test_profile_accepts_tuples_and_integer_inputs():
    """A tuple is one argument, as Stage passes it (AmoebaNet's cells take a pair)."""
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(10, 4)

        def forward(self, pair):
            ids, mask = pair
            return self.table(ids), mask

    class Head(nn.Module):
        def forward(self, pair):
            hidden, mask = pair
            return hidden * mask.unsqueeze(-1)

    ids = torch.randint(0, 10, (2, 5))
    layers = [Embed(), Head()]
    costs = profile_costs(layers.__getitem__, 2, (ids, torch.ones(2, 5)), by="time", device="cpu")
    assert all(c > 0 for c in costs)


def test_profile_runs_amoebanet_whose_cells_take_a_pair():
    cfg = make_config(model="amoebanet", cells=1, filters=4, image_size=8, channels=3, classes=10)
    layers = build_layers(cfg, range(len(registry.layer_factories(cfg))))
    for by in ("time", "memory"):
        costs = profile_costs(layers.__getitem__, len(layers), torch.randn(2, 3, 8, 8), by=by, device="cpu")
        assert len(costs) == 3 * cfg.cells + 4 and all(c > 0 for c in costs), (by, costs)


def test_the_loss_is_timed_with_the_last_layer():
    stack, slow = tiny_stack(), 0.01

    def slow_loss(output):  # a loss that takes at least `slow` seconds, forward included
        time.sleep(slow)
        return output.sum()
    costs = profile_costs(stack.__getitem__, len(stack), torch.randn(16, 8), by="time", device="cpu",
                          loss=slow_loss)
    assert costs[-1] >= slow and max(costs[:-1]) < slow


def _saved_bytes(layer, value, loss=None) -> int:
    """Reference: bytes autograd saves for one forward of `layer` (and `loss`), parameters excluded,
    each storage once, plus the parameter bytes: what --balance-by memory costs a layer."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    leaf = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in value) if isinstance(
        value, tuple) else value.detach().requires_grad_(value.is_floating_point())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = layer(leaf)
        if loss is not None:
            loss(output)
    return sum(saved.values()) + sum(p.numel() * p.element_size() for p in layer.parameters())


def test_profiled_balance_builds_one_layer_at_a_time_and_costs_what_the_whole_model_costs(monkeypatch):
    cfg, data = load_settled(make_config(model="transformer", layers=3, d_model=16, heads=2, max_seq_len=8,
                                         data="synthetic", batch_size=8, microbatches=2, balance_by="memory"))
    n_layers = len(registry.layer_factories(cfg))
    real_build, live, seen = build_layers, weakref.WeakValueDictionary(), []

    def build_and_count(config, indices, backend="torch"):
        layers = real_build(config, indices, backend)
        live.update(layers)
        seen.append(sorted(live.keys()))  # the layers alive right after each build
        return layers
    monkeypatch.setattr(build, "build_layers", build_and_count)
    layout = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    balance, costs, kind = build._choose_balance(cfg, pipeline_spec(cfg, 2), layout, data, "torch", n_layers)
    monkeypatch.undo()
    assert seen == [[i] for i in range(n_layers)]  # each layer freed before the next is built
    whole = build_layers(cfg, range(n_layers))  # the reference: every layer at once
    value, targets = data.batch(0, cfg.batch_size // cfg.microbatches)
    loss_sum = registry.loss_fn(cfg)
    expected = []
    for i in range(n_layers):
        last = i == n_layers - 1
        expected.append(_saved_bytes(whole[i], value, (lambda out: loss_sum(out, targets)) if last else None))
        if not last:
            with torch.no_grad():
                value = whole[i](value)
    assert costs == [float(c) for c in expected] and kind == "memory"
    assert costs[-1] > _saved_bytes(whole[n_layers - 1], value)  # the head's logits and cross entropy count
    assert balance == balance_by_cost(costs, 2)


def test_format_cut_lists_each_stage():
    plan = format_cut([2, 1], [1.0, 1.0, 2.0], [10, 20, 30], by="time")
    lines = plan.splitlines()
    assert len(lines) == 3 and "0-1" in lines[1] and "30" in lines[1] and "50.0%" in lines[2]


def test_format_cut_labels_interleaved_and_v_chunks_with_their_stage():
    for schedule, stages in (("interleaved", [0, 1, 0, 1]), ("zbv", [0, 1, 1, 0])):  # c mod K; the V
        placement = chunk_placement(schedule, 2, 2)
        table = format_cut([1, 1, 1, 1], [1.0] * 4, [10] * 4, by="params", placement=placement).splitlines()
        assert table[0].split()[0] == "chunk"
        assert [" ".join(row.split()[:3]) for row in table[1:]] == [
            f"{c} (stage {s})" for c, s in enumerate(stages)], schedule
