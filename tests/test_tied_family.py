"""A new family with a tied head needs no engine change: a toy language model (a lookup table, a
tanh layer, a bias-free readout) declares in its FAMILY that its readout's weight is its lookup
table, and nothing else. The pipeline then trains it at K=1 (one shared Parameter) and K=2 (two
copies, gradients summed) exactly as a single-device PyTorch model whose two layers hold one
Parameter, and its checkpoint stores the weight once, under the declared source's name."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from minipipe.build import build_run
from minipipe.checkpoint.checkpointer import save_checkpoint
from minipipe.config import make_config
from minipipe.data import DataCursor
from minipipe.layers import build_layers
from minipipe.models import registry
from minipipe.models.family import Family, TiedWeight
from tests.harness import assert_close_tensors, merge_stages, reference_steps, run_steps
from tests.spawn import run_workers

# The toy family stands in for the family that --model transformer names: the config's fields
# (layers, d_model, vocab, seq_len, --tie-embeddings) are all it reads.
CFG = dict(model="transformer", layers=2, d_model=8, heads=2, max_seq_len=8, data="synthetic",
           dtype="float64", batch_size=8, microbatches=2, lr=1e-2, warmup=0, tie_embeddings=True)
SOURCE, COPY = "layers.0.table.weight", "layers.3.out.weight"
STEPS = 2


class Lookup(nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.table = nn.Embedding(vocab, width)

    def forward(self, ids):
        return self.table(ids)


class Mix(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class Readout(nn.Module):
    def __init__(self, width, vocab):
        super().__init__()
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, x):
        return self.out(x)


def _factories(cfg, backend):
    return ([lambda: Lookup(cfg.vocab, cfg.d_model)] + [lambda: Mix(cfg.d_model)] * cfg.layers
            + [lambda: Readout(cfg.d_model, cfg.vocab)])


def _loss(backend):
    def loss_sum(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return loss_sum


TOY = Family(
    name="toy", unit="token", data_kind="tokens", default_data="synthetic", depth_field="layers",
    fixed_layers=2, layers_per_depth=1, layer_factories=_factories, make_loss=_loss,
    count_loss_units=lambda targets: targets.numel(), units_per_sample=lambda cfg: cfg.seq_len,
    input_shape=lambda cfg, rows: (rows, cfg.seq_len), targets_shape=lambda cfg, rows: (rows, cfg.seq_len),
    planning_defaults=lambda cfg: {"vocab": cfg.vocab or 256}, describe=lambda cfg: "toy",
    tied_weight=lambda cfg: TiedWeight(0, "table.weight", cfg.layers + 1, "out.weight"))


def _use_toy():
    registry.FAMILIES["transformer"] = TOY  # in this process only (workers call it themselves)


def _k2_worker(rank, world_size, ckpt):
    _use_toy()
    result = run_steps(STEPS, watch=(SOURCE, COPY), **CFG)
    run = build_run(make_config(**CFG, ckpt_dir=ckpt))
    run.engine.train_step(*run.dataset.batch(0, 8), 0, 1e-3, 1.0)  # the optimizer's state exists
    save_checkpoint(run, DataCursor(run.dataset, 8), 0, 1e-3)
    return result


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.FAMILIES, "transformer", TOY)


def test_the_declared_weight_is_one_parameter_on_one_stage_and_an_equal_copy_alone(toy):
    cfg = make_config(**CFG, vocab=32)
    layers = build_layers(cfg, range(4))
    assert layers[3].out.weight is layers[0].table.weight
    alone = build_layers(cfg, [3])[3]
    assert alone.out.weight is not layers[0].table.weight and torch.equal(alone.out.weight, layers[0].table.weight)


def test_a_tied_toy_family_trains_as_one_shared_weight_at_k1_and_k2(toy, tmp_path):
    reference = reference_steps(STEPS, **CFG)
    assert COPY not in reference["grads"]  # one Parameter: clip_grad_norm_ counts it once
    k2 = run_workers(_k2_worker, 2, str(tmp_path), timeout_s=300)
    for n_stages, stages in ((1, [run_steps(STEPS, watch=(SOURCE, COPY), **CFG)]), (2, k2)):
        what = f"toy tied K={n_stages}"
        got = merge_stages(stages)
        copy_grad = got["grads"].pop(COPY, None)
        if n_stages > 1:  # two copies, each with the summed gradient
            assert torch.equal(copy_grad, got["grads"][SOURCE]), what
        assert_close_tensors(got["grads"], reference["grads"], 1e-10, what + " first-step gradients")
        assert_close_tensors(got["weights"], reference["weights"], 1e-10, what + " weights")
        assert got["losses"] == pytest.approx(reference["losses"], rel=1e-10, abs=0), what
        for step in range(STEPS):
            copies = {n: t for s in stages for n, t in s["watched"][step].items()}
            assert torch.equal(copies[SOURCE], copies[COPY]), f"{what}: step {step}"
    stored = {}
    for file in sorted((tmp_path / "step-000001").glob("*.safetensors")):
        stored.update(load_file(file))
    assert SOURCE in stored and f"{SOURCE}.exp_avg" in stored
    assert not any(name.startswith(COPY) for name in stored)  # the weight is stored once
